"""layer_decay: per-layer learning rates from timm's group_matcher (or the structural rule),
kept through every schedule, resumed exactly, shown by `inspect --schedule`, misuse located."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from timm.models._manipulate import group_parameters
from timm.optim import param_groups_layer_decay

from surgery.cli import main
from surgery.errors import SpecError
from surgery.model.builder import build
from surgery.model.groups import STRUCTURE_RULE, TIMM_RULE, layer_map
from surgery.runs import read_metrics
from surgery.spec import load_spec
from surgery.train.optim import build_optimizer, build_param_groups, layer_lrs, set_lrs
from surgery.train.schedule import Plateau, lrs_at

MARK = "# <-"


def _spec(backbone: str, groups: list, **model: object) -> dict:
    return {
        "model": {"backbone": backbone, "num_classes": 10, "pretrained": False, **model},
        "data": {"name": "digits", "image_size": 32, "num_workers": 0},
        "train": {"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
        "groups": groups,
    }


DECAY_ALL = [{"name": "all", "params": "*", "lr": 1e-3, "layer_decay": 0.75}]


def _by_layer(param_groups: list[dict]) -> dict[tuple[int, bool], tuple[float, set[str]]]:
    return {(pg["layer"], pg["decay"]): (pg["lr_scale"], set(pg["param_names"])) for pg in param_groups}


def _timm_by_layer(model: torch.nn.Module, decay: float) -> dict[tuple[int, bool], tuple[float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=getattr(model, "no_weight_decay", set)(), layer_decay=decay
    )
    out = {}
    for g in groups:
        # timm's own names are "layer_<id>_decay" / "layer_<id>_no_decay"; rebuild the key from the scale
        layer = round(torch.log(torch.tensor(g["lr_scale"])).item() / torch.log(torch.tensor(decay)).item())
        out[(layer, g["weight_decay"] > 0)] = (g["lr_scale"], {names[id(p)] for p in g["params"]})
    top = max(layer for layer, _ in out)  # timm counts the scale's exponent from the top
    return {(top - layer, d): v for (layer, d), v in out.items()}


@pytest.mark.parametrize(
    "backbone, args",
    [
        ("timm:resnet18", {}),
        ("timm:convnext_atto", {}),
        ("timm:efficientnet_b0", {}),
        ("timm:vit_tiny_patch16_224", {"img_size": 32}),
    ],
)
def test_layers_equal_timm_param_groups_layer_decay(backbone, args):
    built = build(load_spec(_spec(backbone, DECAY_ALL, args=args)))
    assert built.groups[0].layers.rule == TIMM_RULE
    ours = _by_layer(build_param_groups(built.model, built.groups, built.spec.train))
    theirs = _timm_by_layer(built.model, 0.75)
    assert ours.keys() == theirs.keys()
    for key, (scale, names) in theirs.items():
        assert ours[key][1] == names, key
        assert ours[key][0] == pytest.approx(scale, rel=1e-12), key
    assert max(layer for layer, _ in ours) >= 9  # one layer per block, not a handful of stages


def test_torchvision_resnet18_falls_back_to_the_structural_rule_which_matches_timm_resnet18():
    built = build(load_spec(_spec("torchvision:resnet18", DECAY_ALL)))
    layers = built.groups[0].layers
    assert layers.rule == STRUCTURE_RULE
    reference = timm.create_model("resnet18", num_classes=10)  # the same parameter names
    assert dict(layers.layer_of) == group_parameters(reference, reference.group_matcher(coarse=False), reverse=True)


class _Encoder(torch.nn.Module):  # vit-like: a top-level child that holds a stack, and its own parameter
    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(torch.zeros(4))
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
        self.ln = torch.nn.LayerNorm(4)


def test_the_structural_rule_on_a_hand_made_model():
    model = torch.nn.Module()
    model.token = torch.nn.Parameter(torch.zeros(4))
    model.conv = torch.nn.Conv2d(4, 4, 1)
    model.bn = torch.nn.BatchNorm2d(4)  # a stem of leaves: one layer with conv
    model.encoder = _Encoder()
    model.fc = torch.nn.Linear(4, 2)
    layers = layer_map(model, head=("fc",), inserted=())
    assert dict(layers.layer_of) == {
        "token": 0,
        "conv.weight": 0,
        "conv.bias": 0,
        "bn.weight": 0,
        "bn.bias": 0,
        "encoder.pos": 0,
        **{f"encoder.layers.{i}.{p}": i + 1 for i in range(3) for p in ("weight", "bias")},
        "encoder.ln.weight": 4,
        "encoder.ln.bias": 4,
        "fc.weight": 5,
        "fc.bias": 5,
    }
    assert layers.top == 5 and layers.scale(3, 0.5) == 0.25


def test_inserted_modules_take_the_layer_of_their_block_and_a_declared_head_is_the_top():
    spec = _spec("timm:resnet18", DECAY_ALL, head={"hidden": [16]})
    spec["surgery"] = [
        {"insert": "se", "at": "layer3", "position": "after"},
        {"insert": "se", "at": "layer2", "position": "before"},
        {"insert": "se", "at": "layer1.0.conv1"},
    ]
    built = build(load_spec(spec))
    layer_of = built.groups[0].layers.layer_of
    top = built.groups[0].layers.top

    def layer(prefix: str) -> set[int]:
        return {i for n, i in layer_of.items() if n.startswith(prefix + ".")}

    assert layer("layer3.se_after") == layer("layer3.1") == {6}
    assert layer("layer2.se_before") == layer("layer2.0") == {3}
    assert layer("layer1.0.conv1.se_after") == layer("layer1.0") == {1}
    head = {i for n, i in layer_of.items() if any(n.startswith(h + ".") for h in built.head)}
    assert head == {top} and top == 9
    assert {i for n, i in layer_of.items() if i == top} and all(
        any(n.startswith(h + ".") for h in built.head) for n, i in layer_of.items() if i == top
    )


SCHEDULED = _spec(
    "timm:resnet18",
    [
        {"name": "head", "params": "@head", "lr": 0.01},
        {"name": "body", "params": "*", "lr": {0: 1e-3, 3: 5e-4}, "layer_decay": 0.5, "unfreeze_at": 1},
        # frozen throughout: its parameters never get optimizer state
    ],
)
SCHEDULED["train"] |= {"epochs": 5, "scheduler": {"name": "cosine", "warmup_epochs": 1, "per_step": True}}


def test_every_schedule_keeps_the_per_layer_ratios():
    spec = load_spec(SCHEDULED)
    built = build(spec)
    optimizer = build_optimizer(built.model, built.groups, spec.train)
    body = built.groups[1]
    scales = body.lr_scales()
    assert len(scales) == 9 and scales[8] == 0.5 and scales[0] == 0.5**9
    plateau = Plateau(factor=0.1, patience=0)
    plateau.step(1.0), plateau.step(2.0)  # one reduction
    for t in (0.0, 0.5, 1.0, 2.25, 3.0, 4.9):
        for factor in (1.0, plateau.current):
            lrs = lrs_at(spec, t, factor)
            set_lrs(optimizer, lrs)
            seen = {}
            for pg in optimizer.param_groups:
                expected = lrs[pg["group"]] * (scales[pg["layer"]] if pg["group"] == "body" else 1.0)
                assert pg["lr"] == pytest.approx(expected, rel=1e-12)
                seen.setdefault(pg["group"], {})[str(pg["layer"])] = pg["lr"]
            assert seen["body"] == pytest.approx(layer_lrs(built.groups, lrs)["body"])
    # lr-find multiplies every group's lr: the layers keep their ratios
    set_lrs(optimizer, {g: lr * 7.0 for g, lr in lrs_at(spec, 2.0).items()})
    body_lrs = {pg["layer"]: pg["lr"] for pg in optimizer.param_groups if pg["group"] == "body"}
    assert all(body_lrs[i] / body_lrs[8] == pytest.approx(0.5 ** (8 - i)) for i in body_lrs)


def test_one_adam_step_gives_state_to_trainable_layers_only():
    from surgery.train.loop import apply_trainable

    spec = load_spec(SCHEDULED)
    built = build(spec)
    optimizer = build_optimizer(built.model, built.groups, spec.train)
    apply_trainable(built.model, built.groups, 0)  # epoch 0: only the head trains
    built.model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    with_state = {
        n for pg in optimizer.param_groups for n, p in zip(pg["param_names"], pg["params"]) if p in optimizer.state
    }
    assert with_state == set(built.groups[0].params)  # the frozen body, every layer of it: no moments
    assert len({pg["layer"] for pg in optimizer.param_groups if pg["group"] == "body"}) == 9


# a tiny run: head from epoch 0, the body with layer_decay from epoch 1, the stem never
RUN = _spec(
    "timm:resnet10t",
    [
        {"name": "head", "params": "@head", "lr": 0.01},
        {"name": "stem", "params": "conv1", "lr": 0.01, "unfreeze_at": "never"},
        {"name": "body", "params": "*", "lr": 0.005, "layer_decay": 0.6, "unfreeze_at": 1},
    ],
)
RUN["train"] |= {
    "epochs": 2,
    "batch_size": 8,
    "limit_batches": 2,
    "channels_last": False,
    "cache_features": "off",  # the head-only first epoch would run the body over the whole data set
    "scheduler": {"name": "cosine", "warmup_epochs": 1, "per_step": True},
}

# Runs `surgery run ARGS` in a child killed the moment epoch 0's checkpoint is on disk.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import surgery.train.runner as train
    from surgery.cli import main
    real_save = train.save_torch
    def save_torch(path, obj):
        real_save(path, obj)
        os.kill(os.getpid(), signal.SIGKILL)
    train.save_torch = save_torch
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def run_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "decay.yaml"
    path.write_text(json.dumps(RUN))
    return path


@pytest.fixture(scope="module")
def reference(run_spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", str(run_spec), "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # one short run (shared with the resume test)
def test_a_run_logs_each_layers_lr_and_frozen_parameters_get_no_optimizer_state(reference):
    rows = read_metrics(reference / "metrics.jsonl")
    assert [sorted(r["layer_lr"]) for r in rows] == [["body"], ["body"]]
    lr1 = rows[1]["layer_lr"]["body"]
    top = max(lr1, key=int)
    assert lr1[top] == pytest.approx(rows[1]["lr"]["body"] * 0.6)
    assert all(lr1[i] == pytest.approx(lr1[top] * 0.6 ** (int(top) - int(i))) for i in lr1)
    from surgery.train.trackers import scalars

    assert scalars(rows[1])[f"layer_lr/body/{top}"] == lr1[top]  # what every tracker logs
    assert f"layer_lr/body/{top}" in (reference / "metrics.csv").read_text().splitlines()[0].split(",")
    state = torch.load(reference / "checkpoints" / "last.pt", weights_only=False)["optimizer"]
    with_state = {
        name
        for pg in state["param_groups"]
        for index, name in zip(pg["params"], pg["param_names"])
        if index in state["state"]
    }
    assert with_state and not {n for n in with_state if n.startswith("conv1.")}  # the frozen stem: no moments
    assert {n for n in with_state if n.startswith("layer1.")}  # the body trained in epoch 1
    assert {pg["group"] for pg in state["param_groups"] if "lr_scale" in pg and pg["lr_scale"] < 1} == {"body"}


@pytest.mark.slow  # three short runs: about 40 s on a busy 2-core CPU
def test_a_resumed_layer_decay_run_is_exact(run_spec, reference, tmp_path):
    from surgery.runs import load_safetensors

    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.run(
        [sys.executable, str(script), "run", str(run_spec), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert child.returncode == -9, child.stdout + child.stderr
    assert main(["run", str(run_spec), "--out", str(out), "--resume"]) == 0
    a, b = load_safetensors(out / "model.safetensors"), load_safetensors(reference / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sa = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["optimizer"]
    sb = torch.load(reference / "checkpoints" / "last.pt", weights_only=False)["optimizer"]
    assert [(pg["lr"], pg["lr_scale"]) for pg in sa["param_groups"]] == [
        (pg["lr"], pg["lr_scale"]) for pg in sb["param_groups"]
    ]
    for pid, st in sb["state"].items():
        assert all(torch.equal(v, sa["state"][pid][k]) for k, v in st.items() if torch.is_tensor(v))
    timing = ("images_per_sec", "seconds", "data_wait_fraction")
    rows = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out / "metrics.jsonl")]
    assert rows == [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(reference / "metrics.jsonl")]


def test_inspect_schedule_prints_each_layers_lr_and_the_rule(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    path = tmp_path / "s.yaml"
    spec = json.loads(json.dumps(SCHEDULED))
    spec["surgery"] = [{"insert": "se", "at": "layer3"}]
    path.write_text(json.dumps(spec))
    assert main(["inspect", str(path), "--schedule"]) == 0
    out = capsys.readouterr().out
    assert "layer-wise lr decay" in out and "timm's group_matcher" in out
    lines = {line.split("│")[3].strip(): line for line in out.splitlines() if line.count("│") > 8}
    assert "layer3.1, layer3.se_after" in lines and "conv1, bn1" in lines
    # body trains from epoch 1 at 1e-3 (warm-up done): layer4.1 (top - 1) gets 0.5 x, the stem 0.5^9 x
    assert lines["layer4.1"].split("│")[5].strip() == "0.5"
    assert "frozen" in lines["layer4.1"].split("│")[6]
    assert lines["layer4.1"].split("│")[7].strip() == "0.0005"
    assert lines["conv1, bn1"].split("│")[7].strip() == f"{1e-3 * 0.5**9:.3g}"
    path.write_text(json.dumps(_spec("torchvision:resnet18", DECAY_ALL)))
    assert main(["inspect", str(path), "--schedule"]) == 0
    assert "layers by structure (no group_matcher)" in capsys.readouterr().out


def test_inspect_shows_trainable_parameters_per_group(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(SCHEDULED))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("│")[1].strip(): line.split("│") for line in out.splitlines() if "│ @head" in line or "│ *" in line
    }
    assert rows["head"][4].strip() == "5.1k" and rows["body"][4].strip() == "0"  # body frozen at epoch 0
    assert "trainable at epoch 0: 5.1k of 11.2M parameters" in out
    assert "x 0.5^depth" in rows["body"][5]


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


HEAD = "model: {backbone: torchvision:resnet18, num_classes: 10, pretrained: false}\ndata: {image_size: 32}\n"
MISUSE = [
    ("zero", "groups:\n  - {name: all, params: '*', layer_decay: 0}  # <-\n", "layer_decay", False, "0"),
    ("above-one", "groups:\n  - {name: all, params: '*', layer_decay: 1.5}  # <-\n", "layer_decay", False, "1.5"),
    ("negative", "groups:\n  - {name: all, params: '*', layer_decay: -0.5}  # <-\n", "layer_decay", False, None),
    ("text", "groups:\n  - {name: all, params: '*', layer_decay: fast}  # <-\n", "layer_decay", False, None),
    (
        "one-depth",
        "groups:\n  - {name: head, params: '@head', layer_decay: 0.7}  # <-\n  - {name: rest, params: '*'}\n",
        "layer_decay",
        True,
        "one depth",
    ),
    (
        "one-block",
        "groups:\n  - {name: b, params: layer1.0, layer_decay: 0.7}  # <-\n  - {name: rest, params: '*'}\n",
        "layer_decay",
        True,
        "one depth",
    ),
    (
        "selects-nothing",
        "groups:\n  - {name: b, params: layer9, layer_decay: 0.7}  # <-\n  - {name: rest, params: '*'}\n",
        "params",
        True,
        "layer9",
    ),
]


@pytest.mark.parametrize("text, key, at_build, found", [m[1:] for m in MISUSE], ids=[m[0] for m in MISUSE])
def test_misuse_is_located(tmp_path, text, key, at_build, found):
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD + text)
    with pytest.raises(SpecError) as info:
        build(load_spec(path)) if at_build else load_spec(path)
    err = info.value
    assert err.file == str(path)
    assert err.line == 1 + HEAD.count("\n") + [i for i, line in enumerate(text.splitlines()) if MARK in line][0]
    assert err.path.split(".")[-1] == key or err.path.endswith(f"{key}"), err.path
    if found is not None:
        assert found in str(err.found) + err.problem, str(err)
