"""`train.early_stop`: the watch, the stop, the best weights kept, resume. The interplay with
plateau unfreezing (early stopping counts only once no group is still waiting to unfreeze) is run
in tests/test_unfreeze_rules.py, on the same run as the rules."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from runs import run_logged

from surgery.errors import SpecError
from surgery.runs import load_safetensors, read_metrics
from surgery.spec import MonitorSpec, load_spec
from surgery.train.schedule import EarlyStop, Watch

WATCHES = [  # (monitor, min_delta, values, the epoch it fires at or None, best epoch)
    ("val_loss", 0.0, [1.0, 0.9, 0.9, 0.95], 3, 1),  # an equal value is no improvement
    (
        "val_loss",
        0.05,
        [1.0, 0.96, 0.94, 0.97, 0.9],
        4,
        2,
    ),  # 0.96 is not 0.05 below 1.0, 0.94 is; 0.9 is not below 0.94
    ("val_acc", 0.0, [0.2, 0.5, 0.4, 0.6, 0.6], None, 3),  # higher is better
    ("val_acc", 0.0, [0.2, math.nan, math.nan], 2, 0),  # NaN never improves
    ("val_loss", 0.0, [math.nan, 2.0, 1.0], None, 2),  # a NaN first value sets no best
]


@pytest.mark.parametrize("monitor,delta,values,fires,best", WATCHES)
def test_watch(monitor: str, delta: float, values: list[float], fires: int | None, best: int) -> None:
    watch = Watch(MonitorSpec(monitor=monitor, patience=2, min_delta=delta))
    fired = [e for e, v in enumerate(values) if watch.update(e, v)]
    assert (fired[0] if fired else None) == fires
    assert watch.best_epoch == best


def test_watch_min_delta_is_absolute_and_strict() -> None:
    watch = Watch(MonitorSpec("val_loss", patience=1, min_delta=0.05))
    assert watch.update(0, 1.0) is False
    assert watch.update(1, 0.95) is True  # exactly min_delta better: not more than it
    watch.reset()
    assert watch.update(2, 1.0) is False and watch.update(3, 0.9499) is False and watch.best_epoch == 3


def test_early_stop_waits_while_a_group_may_still_unfreeze() -> None:
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t"},
            "train": {"epochs": 10, "early_stop": {"monitor": "val_loss", "patience": 2}},
        }
    )
    stop = EarlyStop(spec)
    rows = [{"val_loss": v} for v in (1.0, 2.0, 3.0, 4.0, 1.5, 1.6, 1.7)]
    waiting = [True, True, True, False, False, False, False]  # the last stage starts at epoch 3
    decided = [stop.step(e, r, w) for e, (r, w) in enumerate(zip(rows, waiting))]
    # 1.0 at epoch 0 would be the best; waiting, it is forgotten: epoch 3 sets the best (4.0), 4 improves,
    # 5 and 6 do not, and it stops after the second of them
    assert decided == [False] * 6 + [True]
    assert stop.stopped_at == 6 and stop.watch.best_epoch == 4


def test_no_stop_after_the_last_epoch() -> None:
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t"},
            "train": {"epochs": 3, "early_stop": {"patience": 1, "min_delta": 100}},
        }
    )
    stop = EarlyStop(spec)
    assert [stop.step(e, {"val_loss": 1.0}, False) for e in range(3)] == [False, True, True]
    assert stop.stopped_at == 1 and stop.record(0)["weights_epoch"] == 0
    last = EarlyStop(
        load_spec(
            {
                "model": {"backbone": "timm:resnet10t"},
                "train": {"epochs": 2, "early_stop": {"patience": 1, "min_delta": 100}},
            }
        )
    )
    assert [last.step(e, {"val_loss": 1.0}, False) for e in range(2)] == [False, False]  # nothing cut short
    assert last.record(0) is None


def test_spec_checks(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "model: {backbone: 'timm:resnet10t'}\ntrain:\n  epochs: 4\n  early_stop:\n"
        "    monitor: val_map\n    patience: 4\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.path, info.value.line) == ("train.early_stop.monitor", 5)
    spec = load_spec(path, ["train.early_stop.monitor=val_acc"])
    assert spec.train.early_stop == MonitorSpec("val_acc", 4, 0.0)
    assert any("train.early_stop.patience" in w and "can never end it" in w for w in spec.warnings)
    assert load_spec(path, ["train.early_stop=null"]).train.early_stop is None


# ------------------------------------------------------------------ runs
RUN = {
    "name": "stop",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    # min_delta 10: no epoch improves on the first one of its stage, so the watches fire after exactly `patience`
    "train": {
        "epochs": 6,
        "batch_size": 16,
        "limit_batches": 2,
        "channels_last": False,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "early_stop": {"monitor": "val_loss", "patience": 1, "min_delta": 10},
    },
    "data": {"name": "digits", "image_size": 32, "num_workers": 0, "subset": {"train": 64, "val": 32}},
}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, one_thread) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("stop") / "run"
    return out, run_logged(RUN, out)


def test_stops_and_keeps_the_best_weights(stopped) -> None:
    out, log = stopped
    patience = RUN["train"]["early_stop"]["patience"]
    rows = read_metrics(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(patience + 1))  # epoch 0 sets the best, then `patience` bad
    record = summary["early_stop"]
    assert record == {
        "epoch": patience,
        "monitor": "val_loss",
        "patience": patience,
        "min_delta": 10,
        "best_epoch": 0,
        "best_value": rows[0]["val_loss"],
        "weights_epoch": summary["best_epoch"],
    }
    assert f"early stop after epoch {patience + 1}/6: val_loss has not improved by more than 10" in log
    assert "stopped early after epoch 2, model.safetensors holds epoch" in log
    final, best = (
        load_safetensors(out / "model.safetensors"),
        load_safetensors(out / "checkpoints" / "best.safetensors"),
    )
    assert final.keys() == best.keys() and all(final[k].equal(best[k]) for k in final)
    # the final figures are the best epoch's: its weights, evaluated again
    kept = rows[summary["best_epoch"]]
    assert summary["final_val_acc"] == kept["val_acc"] and summary["best_val_acc"] == kept["val_acc"]
    assert summary["final_val_loss"] == pytest.approx(kept["val_loss"], rel=1e-6)
    assert summary["final"] == rows[-1]  # the last metrics row stays the last epoch trained


def test_a_stopped_run_resumed_does_not_train_on(stopped, tmp_path: Path) -> None:
    out, _ = stopped
    copy_ = tmp_path / "run"
    shutil.copytree(out, copy_)
    log = run_logged(RUN, copy_, resume=True)
    assert "it stopped early after epoch 2/6; writing the final files" in log and "epoch   3/6" not in log
    assert read_metrics(copy_ / "metrics.jsonl") == read_metrics(out / "metrics.jsonl")
    before, after = (json.loads((d / "summary.json").read_text()) for d in (out, copy_))
    assert {k: v for k, v in after.items() if k != "wall_seconds"} == {
        k: v for k, v in before.items() if k != "wall_seconds"
    }
    a, b = load_safetensors(out / "model.safetensors"), load_safetensors(copy_ / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
