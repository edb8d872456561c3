"""surgery.build end to end: every pretrained tensor survives surgery, identity init changes nothing,
surgered weights round-trip, and a surgered model copies, pickles, compiles and exports."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import build, load_spec
from surgery.model.insert import Inserted

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# backbone -> surgery: between blocks (Sequential targets), inside blocks (swapped leaves), by type
FAMILIES: dict[str, list[dict]] = {
    "torchvision:resnet18": [
        {"insert": "cbam", "at": "layer*.*.bn2"},
        {"insert": "se", "at": "layer2"},
        {"insert": "eca", "at": "maxpool", "position": "before"},
    ],
    "torchvision:resnet50": [
        {"insert": "cbam", "at": "layer*.*.bn3"},
        {"insert": "se", "at": ["layer3", "layer4.0.conv2"]},
    ],
    "torchvision:vgg16": [{"insert": "cbam", "at": {"type": "MaxPool2d"}}],
    "torchvision:vgg16_bn": [{"insert": "cbam", "at": {"type": "MaxPool2d"}}, {"insert": "eca", "at": "features.1"}],
    "torchvision:mobilenet_v3_small": [
        {"insert": "se", "at": "features.*.block.0"},
        {"insert": "cbam", "at": "features.12"},
    ],
    "timm:resnet18": [{"insert": "cbam", "at": "layer*.*.bn2"}, {"insert": "ese", "at": "layer4"}],
    "timm:efficientnet_b0": [{"insert": "cbam", "at": "blocks.*.*.bn2"}, {"insert": "se", "at": "blocks.6"}],
    "timm:convnext_atto": [{"insert": "cbam", "at": "stages.*"}, {"insert": "eca", "at": "stages.*.blocks.0.conv_dw"}],
}
# VGG's 528 MB of weights: safetensors writes and maps them far faster than torch.save / torch.load
SUFFIX = {"torchvision:vgg16": ".safetensors", "torchvision:vgg16_bn": ".safetensors"}


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Family:
    backbone: str
    plain: nn.Module  # the backbone without surgery, holding the "pretrained" weights
    weights: dict[str, torch.Tensor]
    built: object  # Built: the surgered model, pretrained from the weight file
    file: Path


def make_family(backbone: str, folder: Path) -> Family:
    # seed 1 for the weights, seed 0 (the default) for the surgered build: a load is visible
    plain = build(load_spec({"model": {"backbone": backbone}, "seed": 1})).model.eval()
    weights = {k: v.contiguous() for k, v in plain.state_dict().items()}  # plain is never changed: no copy
    path = folder / (backbone.replace(":", "_") + SUFFIX.get(backbone, ".pth"))
    if path.suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    built = build(load_spec({"model": {"backbone": backbone, "pretrained": str(path)}, "surgery": FAMILIES[backbone]}))
    return Family(backbone, plain, weights, built, path)


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family("torchvision:vgg16", tmp_path_factory.mktemp("vgg16"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    if request.param == "torchvision:vgg16":
        return request.getfixturevalue("vgg16")
    return make_family(request.param, tmp_path_factory.mktemp("family"))


def eval_out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------- 1. preservation
def test_every_pretrained_key_survives_with_a_bit_identical_tensor(family: Family) -> None:
    state = family.built.model.state_dict()
    missing = [k for k in family.weights if k not in state]
    assert missing == []
    changed = [k for k, v in family.weights.items() if not torch.equal(state[k], v)]
    assert changed == []
    report = family.built.report
    assert set(report.loaded) == set(family.weights)
    assert report.source == str(family.file) and report.unused == [] and report.reinitialised == {}
    assert set(report.new) == set(state) - set(family.weights)  # surgery only adds
    assert family.built.inserted, "the surgery must have inserted something"
    assert all(any(k.startswith(i.path + ".") for k in report.new) for i in family.built.inserted)


def test_inside_block_targets_were_hit(family: Family) -> None:
    paths = [i.path for i in family.built.inserted]
    expected = {
        "torchvision:resnet18": [
            "layer1.0.bn2.cbam_after",
            "layer4.1.bn2.cbam_after",
            "layer2.se_after",
            "maxpool.eca_before",
        ],
        "torchvision:resnet50": ["layer1.2.bn3.cbam_after", "layer4.0.conv2.se_after", "layer3.se_after"],
        "torchvision:vgg16": ["features.4.cbam_after", "features.30.cbam_after"],
        "torchvision:vgg16_bn": ["features.6.cbam_after", "features.1.eca_after"],
        "torchvision:mobilenet_v3_small": ["features.1.block.0.se_after", "features.12.cbam_after"],
        "timm:resnet18": ["layer3.1.bn2.cbam_after", "layer4.ese_after"],
        "timm:efficientnet_b0": ["blocks.0.0.bn2.cbam_after", "blocks.5.3.bn2.cbam_after", "blocks.6.se_after"],
        "timm:convnext_atto": ["stages.0.cbam_after", "stages.3.blocks.0.conv_dw.eca_after"],
    }[family.backbone]
    assert set(expected) <= set(paths)


# --------------------------------------------------------------------------- 2. identity
def test_identity_init_computes_what_the_backbone_computes(family: Family) -> None:
    diff = (eval_out(family.built.model) - eval_out(family.plain)).abs().max()
    assert diff < 1e-5


@pytest.mark.parametrize("backbone", ["torchvision:resnet18", "timm:convnext_atto"])
def test_default_init_changes_what_the_model_computes(backbone: str) -> None:
    plain = build(load_spec({"model": {"backbone": backbone}})).model
    surgery = [{**item, "init": "default"} for item in FAMILIES[backbone]]
    built = build(load_spec({"model": {"backbone": backbone}, "surgery": surgery}), state_dict=plain.state_dict())
    assert not any(m.gate is not None for m in built.model.modules() if isinstance(m, Inserted))
    assert (eval_out(built.model) - eval_out(plain)).abs().max() > 1e-4


# --------------------------------------------------------------------------- 3. VGG16 channels
def test_vgg16_gets_cbam_after_each_of_its_five_pools(vgg16: Family) -> None:
    inserted = vgg16.built.inserted
    assert [i.target for i in inserted] == ["features.4", "features.9", "features.16", "features.23", "features.30"]
    assert [i.channels for i in inserted] == [64, 128, 256, 512, 512]
    for ins in inserted:
        cbam = vgg16.built.model.get_submodule(ins.path).attn
        assert cbam.channel.fc1.weight.shape[1] == ins.channels  # C -> C/r
        assert cbam.channel.fc2.weight.shape[0] == ins.channels  # C/r -> C
    assert all(
        isinstance(vgg16.built.model.features[int(t.split(".")[1])], nn.MaxPool2d) for t in (i.target for i in inserted)
    )


# --------------------------------------------------------------------------- 4. round trips
SURGERY = FAMILIES["torchvision:resnet18"]


def randomised(model: nn.Module, seed: int = 3) -> nn.Module:
    """Every parameter and buffer (gates included) away from its initial value, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def trained() -> tuple[object, torch.Tensor]:
    spec = load_spec({"model": {"backbone": "torchvision:resnet18", "num_classes": 10}, "surgery": SURGERY})
    built = build(spec)
    randomised(built.model)
    return built, eval_out(built.model)


@pytest.mark.parametrize("how", ["state_dict", "pth", "safetensors"])
def test_surgered_weights_reload_into_a_rebuilt_model(trained, how: str, tmp_path: Path) -> None:
    built, reference = trained
    state = built.model.state_dict()
    model = {"backbone": "torchvision:resnet18", "num_classes": 10, "pretrained": False}
    if how == "state_dict":
        path = tmp_path / "model.pth"
        torch.save(state, path)
        rebuilt = build(load_spec({"model": model, "surgery": SURGERY}), state_dict=torch.load(path, weights_only=True))
    else:
        path = tmp_path / f"model.{how}"
        torch.save(state, path) if how == "pth" else save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        rebuilt = build(load_spec({"model": {**model, "pretrained": str(path)}, "surgery": SURGERY}))
    assert set(rebuilt.report.loaded) == set(state) and rebuilt.report.new == []
    assert torch.equal(eval_out(rebuilt.model), reference)


def test_safetensors_of_a_surgered_model_hold_every_key(trained, tmp_path: Path) -> None:
    built, _ = trained
    save_file({k: v.contiguous() for k, v in built.model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(built.model.state_dict())


def test_two_builds_of_one_spec_are_identical() -> None:
    spec = load_spec(
        {
            "model": {"backbone": "timm:convnext_atto"},
            "seed": 5,
            "surgery": [{**item, "init": "default"} for item in FAMILIES["timm:convnext_atto"]],
        }
    )
    rng = torch.get_rng_state()
    first, second = build(spec).model.state_dict(), build(spec).model.state_dict()
    assert torch.equal(torch.get_rng_state(), rng)  # build leaves the caller's random stream alone
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build(load_spec({**spec.raw, "seed": 6})).model.state_dict()
    assert not torch.equal(
        other["stages.0.cbam_after.attn.channel.fc1.weight"], first["stages.0.cbam_after.attn.channel.fc1.weight"]
    )


# --------------------------------------------------------------------------- 5. copy, pickle, compile, export
def test_deepcopy_keeps_structure_and_outputs(trained) -> None:
    built, reference = trained
    clone = copy.deepcopy(built.model)
    assert torch.equal(eval_out(clone), reference)
    assert type(clone.maxpool) is type(built.model.maxpool) and clone.maxpool._surgery_before == ("eca_before",)
    assert list(clone.state_dict()) == list(built.model.state_dict())


def test_pickle_protocol_2_round_trips(trained) -> None:
    built, reference = trained
    clone = pickle.loads(pickle.dumps(built.model, protocol=2))
    assert torch.equal(eval_out(clone), reference)


def test_a_pickled_model_loads_in_a_fresh_process(trained, tmp_path: Path) -> None:
    built, reference = trained
    torch.save(built.model, tmp_path / "model.pt")  # torch.save pickles with protocol 2
    torch.save({"x": X, "y": reference}, tmp_path / "io.pt")
    code = (
        "import torch, sys\n"
        "torch.set_num_threads(1)  # as in this process: bit-identical kernels\n"
        "m = torch.load(sys.argv[1], weights_only=False).eval()\n"
        "io = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(io['x']), io['y'])\n"
        "print(type(m.layer1[0].bn2).__name__, repr(m.layer1[0].bn2).split('(')[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model.pt"), str(tmp_path / "io.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "BatchNorm2d"


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_matches_eager(trained, backend: str) -> None:
    built, reference = trained
    torch._dynamo.reset()
    try:
        compiled = torch.compile(copy.deepcopy(built.model).eval(), backend=backend, fullgraph=True)
        with torch.no_grad():
            out = compiled(X)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager(trained, request: pytest.FixtureRequest) -> None:
    # inductor compiles C++ kernels: about 50 s on 2 cores, so it runs only when asked for (-m slow)
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("inductor takes ~50 s here; run with -m slow")
    built, reference = trained
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(copy.deepcopy(built.model).eval())(X)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_torch_export_matches_eager(trained) -> None:
    built, reference = trained
    exported = torch.export.export(copy.deepcopy(built.model).eval(), (X,))
    with torch.no_grad():
        out = exported.module()(X)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert {k for k in exported.state_dict} >= {k for k, _ in built.model.named_parameters()}


# --------------------------------------------------------------------------- train-mode output, model.args blame
@pytest.mark.parametrize(
    ("backbone", "size", "args"),
    [
        ("torchvision:googlenet", 32, {}),  # aux_logits turned off for the user: its aux heads stay, untrained
        ("torchvision:inception_v3", 75, {"aux_logits": False}),  # its aux head needs ~299 px, so at 75 px: off
    ],
)
def test_a_train_mode_forward_returns_one_logits_tensor(backbone: str, size: int, args: dict) -> None:
    built = build(
        load_spec({"model": {"backbone": backbone, "num_classes": 10, "args": args}, "data": {"image_size": size}})
    )
    assert built.train_output == "Tensor"
    out = built.model.train()(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize(
    ("backbone", "size", "path", "words"),
    [
        ("torchvision:googlenet", 32, "model.args.aux_logits", "GoogLeNetOutputs"),
        ("torchvision:inception_v3", 75, "data.image_size", "aux_logits: false"),  # the aux head fails at 75 px
    ],
)
def test_auxiliary_outputs_are_a_located_error(backbone: str, size: int, path: str, words: str) -> None:
    from surgery import SpecError

    args = {"aux_logits": True} if "googlenet" in backbone else {}
    with pytest.raises(SpecError) as info:
        build(
            load_spec({"model": {"backbone": backbone, "num_classes": 10, "args": args}, "data": {"image_size": size}})
        )
    assert info.value.path == path and words in str(info.value)


@pytest.mark.parametrize(
    ("backbone", "args", "path"),
    [
        ("timm:resnet18", {"global_pool": "zzz"}, "model.args.global_pool"),  # a timm assert, not a traceback
        ("timm:resnet18", {"drop_rate": 0.1, "global_pool": "zzz"}, "model.args.global_pool"),
        ("timm:resnet18", {"drop_rate": 2.0}, "model.args.drop_rate"),  # fails in the probe, not at data.image_size
        ("torchvision:vgg11", {"dropout": 2.0}, "model.args.dropout"),
        ("timm:resnet18", {"no_such_key": 1}, "model.args"),  # a key the constructor does not take
    ],
)
def test_a_rejected_model_argument_is_blamed_on_its_key(backbone: str, args: dict, path: str) -> None:
    from surgery import SpecError

    with pytest.raises(SpecError) as info:
        build(load_spec({"model": {"backbone": backbone, "num_classes": 10, "args": args}}))
    assert info.value.path == path
    assert path.rsplit(".", 1)[1] in str(info.value) or path == "model.args"
