"""`surgery lr-find`: the sweep scales every trainable group's lr by one factor (ratios kept),
stops when the loss diverges, suggests a multiplier by the valley rule, writes a plot and a JSON
record outside any run directory, repeats exactly, and prints --set lines that apply it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.errors import UsageError
from surgery.spec import load_spec
from surgery.train import optim
from surgery.train.lr_find import lr_find, multipliers, noise, set_lines, smooth, steepest, valley

SPEC = {
    "name": "sweep",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "train": {"epochs": 4, "batch_size": 16, "channels_last": False, "optimizer": {"name": "sgd", "lr": 0.01}},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
    "groups": [
        {"name": "head", "params": ["@head"], "lr": 0.01},
        {"name": "top", "params": ["layer4"], "lr": {0: 0.001, 2: 0.0005}},
        {"name": "rest", "params": ["*"], "lr": 0.0001, "unfreeze_at": 2},
    ],
}
STEPS = 20


# ------------------------------------------------------------------ pure parts
def test_multipliers_are_geometric_from_start_to_end() -> None:
    factors = multipliers(1e-4, 1e2, 13)
    assert factors[0] == pytest.approx(1e-4) and factors[-1] == pytest.approx(1e2)
    ratios = {round(b / a, 9) for a, b in zip(factors, factors[1:])}
    assert len(ratios) == 1


def test_smoothing_has_no_lag() -> None:
    ramp = [float(i) for i in range(40)]
    assert smooth(ramp)[5:-5] == pytest.approx(ramp[5:-5])  # a centred mean leaves a straight line in place


def test_valley_and_steepest_land_in_the_fall() -> None:
    """Flat, then a fall over steps 40..69 (steepest at 55), then divergence."""
    n = 100
    curve = [
        2.0 if i < 40 else 1.5 + math.cos(math.pi * (i - 40) / 30) / 2 if i < 70 else 1.0 + (i - 70) ** 2 / 50
        for i in range(n)
    ]
    factors = multipliers(1e-4, 1e2, n)
    assert 40 <= valley(curve) < 70
    assert abs(steepest(factors, curve) - 55) <= 1
    swinging = curve[:90] + [c - 3.0 * (i % 2) for i, c in enumerate(curve[90:])]  # diverging with steep falls
    assert abs(steepest(factors, swinging) - 55) <= 1
    assert valley([2.0] * 20) is None and valley([2.0, 1.9]) is None  # no fall, or too short to say
    assert valley([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.4]) == 3  # halfway along a fall over steps 0..6


def test_no_suggestion_from_noise_alone() -> None:
    """A flat loss with step-to-step noise has long decreasing subsequences too; they are not a valley."""
    jitter = [0.02 * (((i * 7919) % 13) - 6) / 6 for i in range(100)]  # deterministic, +-0.02
    flat = [2.3 + j for j in jitter]
    smoothed = smooth(flat)
    assert valley(smoothed) is not None  # fastai's rule alone names a point
    assert valley(smoothed, noise(flat, smoothed)) is None
    falling = [2.3 - 0.01 * max(0, i - 30) + j for i, j in enumerate(jitter)]
    smoothed = smooth(falling)
    assert 30 <= valley(smoothed, noise(falling, smoothed)) < 95


def test_set_lines_scale_every_lr_and_keep_tables(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    lines = set_lines(spec, 0.5, ["head", "top"])
    assert lines == ["groups.0.lr=5.0e-03", "groups.1.lr={0: 5.0e-04, 2: 2.5e-04}"]
    scaled = load_spec(SPEC, lines)  # they apply as written
    assert [g.lr for g in scaled.groups] == [((0, 0.005),), ((0, 0.0005), (2, 0.00025)), ((0, 0.0001),)]
    plain = load_spec({k: v for k, v in SPEC.items() if k != "groups"})
    assert set_lines(plain, 3.0, ["all"]) == ["train.optimizer.lr=3.0e-02"]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--stage", "4"], "outside this run of 4 epochs"),
        (["--steps", "2"], "outside 5..2000"),
        (["--start", "1", "--end", "0.1"], "must rise"),
        (["--start", "0"], "positive"),
    ],
)
def test_bad_flags_are_usage_errors(flags: list[str], words: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(SPEC))
    assert main(["lr-find", str(path), *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("error --")  # located at the flag
    assert not (tmp_path / "out").exists()


def test_one_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="one process") as info:
        lr_find(load_spec(SPEC))
    assert "train.batch_size=32" in info.value.hint


def test_no_group_trains_at_the_stage() -> None:
    spec = load_spec(
        {
            **SPEC,
            "groups": [
                {"name": "head", "params": ["@head"], "unfreeze_at": 1},
                {"name": "rest", "params": ["*"], "unfreeze_at": "never"},
            ],
        }
    )
    with pytest.raises(UsageError, match="no group trains at epoch 0") as info:
        lr_find(spec, stage=0)
    assert "e.g. 1" in str(info.value)


def test_refuses_to_write_into_a_run_directory(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(SPEC))
    run_dir = tmp_path / "runs" / "sweep"  # what `surgery run` leaves: spec.yaml, checkpoints/, ...
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(json.dumps(SPEC))
    assert main(["lr-find", str(path), "--steps", "5", "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds a run (spec.yaml, checkpoints)" in err and "sweep-lr-find" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "spec.yaml"]


# ------------------------------------------------------------------ the sweep
@pytest.fixture(scope="module")
def swept(tmp_path_factory, one_thread) -> tuple[Path, str, list[dict]]:
    """`surgery lr-find --stage 0` on digits, every optimizer lr recorded at each step."""
    folder = tmp_path_factory.mktemp("lr-find")
    path = folder / "sweep.yaml"
    path.write_text(json.dumps(SPEC))
    seen: list[dict] = []
    real = optim.set_lrs

    def record(optimizer, lrs):
        seen.append(dict(lrs))
        real(optimizer, lrs)

    optim.set_lrs = record
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            from rich.console import Console

            from surgery.train.lr_find import lr_find_command

            code = lr_find_command(
                str(path), stage=0, steps=STEPS, out=str(folder / "out"), console=Console(file=out, width=300)
            )
        assert code == 0
    finally:
        optim.set_lrs = real
    return folder / "out", out.getvalue(), seen


def test_every_trainable_lr_moves_by_the_same_factor(swept) -> None:
    out, _, seen = swept
    record = json.loads((out / "lr_find.json").read_text())
    base = {g: info["lr"] for g, info in record["groups"].items()}
    assert base == {"head": 0.01, "top": 0.001, "rest": 0.0001}
    assert [info["trainable"] for info in record["groups"].values()] == [True, True, False]
    assert len(seen) >= len(record["multipliers"])  # one set_lrs per step: the optimizer's lrs, step by step
    for lrs, factor in zip(seen, record["multipliers"]):
        assert lrs["head"] / factor == pytest.approx(0.01) and lrs["top"] / factor == pytest.approx(0.001)
        assert lrs["head"] / lrs["top"] == pytest.approx(10)  # the spec's ratio, at every step
    assert record["multipliers"][0] == pytest.approx(1e-4)


def test_record_plot_and_set_lines(swept) -> None:
    out, text, _ = swept
    record = json.loads((out / "lr_find.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = len(record["losses"])
    stopped = record["stopped"]
    assert (stopped is None and n == STEPS) or f"diverged at step {n} " in stopped or "loss became" in stopped
    assert record["rule"] == "valley" and record["suggestion"] is not None
    step = record["suggestion_step"]
    assert record["suggestion"] == pytest.approx(record["multipliers"][step], rel=0.05)  # two significant digits
    assert record["set"] == set_lines(load_spec(SPEC), record["suggestion"], ["head", "top"])
    for line in record["set"]:
        assert ("'" + line + "'" if " " in line else line) in text
    assert "suggested multiplier: x" in text and "valley rule" in text
    assert "rest" in text.split("frozen: ")[1].splitlines()[0]  # named as not swept


def test_the_sweep_repeats_exactly(swept) -> None:
    out, _, _ = swept
    record = json.loads((out / "lr_find.json").read_text())
    again = lr_find(load_spec(SPEC), stage=0, steps=STEPS)
    assert again.losses == record["losses"] and again.suggestion == record["suggestion"]


def test_stops_when_the_loss_diverges(one_thread) -> None:
    spec = load_spec({**SPEC, "groups": [{"name": "all", "params": ["*"], "lr": 0.05}]})
    result = lr_find(spec, steps=30, start=10.0, end=1e6)
    assert result.stopped is not None and len(result.losses) < 30
    assert "diverged" in result.stopped or "loss became" in result.stopped
