"""`surgery sweep`: the sweep file (located errors, variant names), every variant checked before
training, the SQLite study handing each queued trial to one worker only, two worker processes
running a grid exactly once, and a worker killed mid-variant whose variant is resumed by another.

The PostgreSQL case runs when SURGERY_TEST_POSTGRES_URL names a database (.ci/run starts one).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from rich.console import Console  # noqa: E402

from surgery.errors import SpecError  # noqa: E402
from surgery.spec.source import parse_key_path  # noqa: E402
from surgery.sweep import check_variants, open_storage, sweep_command  # noqa: E402
from surgery.sweep.file import load_sweep  # noqa: E402

MARK = "# <-"
POSTGRES = os.environ.get("SURGERY_TEST_POSTGRES_URL")

BASE = """\
model: {backbone: "timm:resnet10t", num_classes: 10, pretrained: false}
surgery:
  - {insert: cbam, at: [layer4], init: identity}
train: {epochs: 1, batch_size: 16, limit_batches: 2}
data: {name: digits, image_size: 32, num_workers: 0, subset: {val: 64}}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path, "base.yaml", BASE)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# --------------------------------------------------------------------------- the sweep file
@dataclass(frozen=True)
class Case:
    id: str
    text: str
    problem: str  # a substring of err.problem
    hint: str | None = None  # a substring of err.hint


CASES = [
    Case(
        "unknown-top-key",
        """
        spec: base.yaml
        sweeps:  # <-
          axes: {seed: [0, 1]}
        """,
        "unknown key 'sweeps'",
        hint="'sweep'",
    ),
    Case(
        "missing-base",
        """
        spec: nosuch.yaml  # <-
        sweep: {axes: {seed: [0, 1]}}
        """,
        "base spec does not exist",
        hint="base.yaml",
    ),
    Case(
        "bad-name",
        """
        name: my sweep  # <-
        spec: base.yaml
        sweep: {axes: {seed: [0, 1]}}
        """,
        "names a folder",
    ),
    Case(
        "sampler-typo",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          sampler: gird  # <-
        """,
        "unknown sampler",
        hint="'grid'",
    ),
    Case(
        "objective-typo",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          objective: best_val_accuracy  # <-
        """,
        "unknown objective",
        hint="'best_val_acc'",
    ),
    Case(
        "axis-not-a-list",
        """
        spec: base.yaml
        sweep:
          axes:
            seed: 3  # <-
        """,
        "lists the values to try",
    ),
    Case(
        "axis-empty",
        """
        spec: base.yaml
        sweep:
          axes:
            seed: []  # <-
        """,
        "without values",
    ),
    Case(
        "labels-clash",
        """
        spec: base.yaml
        sweep:
          axes:
            surgery.0.at:
              - "layer*"
              - layer  # <-
        """,
        "share the run directory name 'layer'",
    ),
    Case(
        "label-with-underscore",
        """
        spec: base.yaml
        sweep:
          axes:
            surgery.0.at:
              last_two: [layer3, layer4]  # <-
        """,
        "part of a run directory's name",
    ),
    Case(
        "empty-key-part",
        """
        spec: base.yaml
        sweep:
          axes:
            train..epochs: [1, 2]  # <-
        """,
        "not a key path",
    ),
    Case(
        "key-twice",
        """
        spec: base.yaml
        sweep:
          axes:
            surgery.0.at: [[layer4]]
            surgery[0].at: [[layer3]]  # <-
        """,
        "surgery.0.at is given twice",
    ),
    Case(
        "range-in-grid",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          ranges:  # <-
            train.optimizer.lr: {low: 1.0e-4, high: 1.0e-2}
        """,
        "grid cannot draw from ranges",
    ),
    Case(
        "range-upside-down",
        """
        spec: base.yaml
        sweep:
          sampler: random
          trials: 4
          ranges:
            train.optimizer.lr: {low: 1.0e-2,
                                 high: 1.0e-4}  # <-
        """,
        "high must be above its low",
    ),
    Case(
        "log-range-from-zero",
        """
        spec: base.yaml
        sweep:
          sampler: tpe
          trials: 4
          ranges:
            train.optimizer.lr:
              low: 0  # <-
              high: 0.1
              log: true
        """,
        "log range starts above zero",
    ),
    Case(
        "tpe-without-budget",
        """
        spec: base.yaml
        sweep:  # <-
          sampler: tpe
          axes: {seed: [0, 1]}
        """,
        "needs a trial budget",
    ),
    Case(
        "grid-with-budget",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          trials: 5  # <-
        """,
        "tries every combination",
    ),
    Case(
        "axis-and-range",
        """
        spec: base.yaml
        sweep:
          sampler: random
          trials: 3
          axes: {train.optimizer.lr: [0.1, 0.01]}
          ranges:
            train.optimizer.lr: {low: 1.0e-4, high: 1.0e-2}  # <-
        """,
        "is an axis and a range",
    ),
    Case(
        "names-too-long",
        """
        spec: base.yaml
        sweep:
          axes:  # <-
            data.root: [data/"""
        + "a" * 250
        + """]
        """,
        "variant names would be up to",
        hint="label the values",
    ),
    Case(
        "grace-too-short",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          heartbeat:
            interval: 10
            grace: 5  # <-
        """,
        "must outlast the heartbeat interval",
    ),
    Case(
        "pruner-typo",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          prune: {pruner: hyperbnd}  # <-
        """,
        "unknown pruner",
        hint="'hyperband'",
    ),
    Case(
        "reduction-factor-too-small",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          prune:
            pruner: successive_halving
            reduction_factor: 1  # <-
        """,
        "reduction_factor",
    ),
    Case(
        "setting-of-another-pruner",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          prune:
            pruner: median
            reduction_factor: 2  # <-
        """,
        "pruner median has no setting reduction_factor",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sweep_file_mistakes_are_located(case: Case, base: Path) -> None:
    path = write(base.parent, "sweep.yaml", case.text)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if MARK in text)
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    err = info.value
    assert (err.file, err.line) == (str(path), line), str(err)
    assert case.problem in err.problem, str(err)
    if case.hint is not None:
        assert err.hint is not None and case.hint in err.hint, str(err)


@pytest.mark.parametrize(
    "key, path",
    [
        ("surgery.0.at", ("surgery", 0, "at")),
        ("surgery[0].at", ("surgery", 0, "at")),
        ("groups[1].lr", ("groups", 1, "lr")),
        ("seed", ("seed",)),
        ("train..epochs", None),
        ("[0]", None),
    ],
)
def test_key_paths_are_dotted_or_bracketed(key: str, path: tuple | None) -> None:
    assert parse_key_path(key) == path


def test_grid_variants_are_named_by_their_labels_and_compared_without_the_seed(base: Path) -> None:
    sweep = load_sweep(
        write(
            base.parent,
            "grid.yaml",
            """
        name: placements
        spec: base.yaml
        set: {train.epochs: 2}
        sweep:
          axes:
            surgery[0].at: {l4: [layer4], l34: [layer3, layer4]}
            groups.0.lr: [1.0e-3, 0.01]
            seed: [0, 1]
        """,
        )
    )
    variants = sweep.grid()
    assert sweep.trials == len(variants) == 8
    assert [v.name for v in variants[:3]] == ["at-l4_lr-0.001_seed-0", "at-l4_lr-0.001_seed-1", "at-l4_lr-0.01_seed-0"]
    assert {v.label for v in variants} == {"at-l4_lr-0.001", "at-l4_lr-0.01", "at-l34_lr-0.001", "at-l34_lr-0.01"}
    assert [v.seed for v in variants[:2]] == [0, 1]
    last = variants[-1]
    assert last.params == {"surgery.0.at": "l34", "groups.0.lr": "0.01", "seed": "1"}
    values = {o.path: o.value for o in last.overrides}
    assert values == {
        ("surgery", 0, "at"): ["layer3", "layer4"],
        ("groups", 0, "lr"): 0.01,
        ("seed",): 1,
        ("name",): "at-l34_lr-0.01_seed-1",
    }
    assert sweep.definition()["set"] == {"train.epochs": 2}


# --------------------------------------------------------------------------- every variant checked first
@pytest.mark.parametrize(
    "axis, bad, problem",
    [
        ("surgery.0.insert", "nosuch", "nosuch"),  # the schema refuses it (load_spec)
        ("surgery.0.at", "[layer9]", "layer9"),  # only the real model can (build)
    ],
)
def test_a_bad_axis_value_stops_the_sweep_at_its_line(base: Path, axis: str, bad: str, problem: str) -> None:
    path = write(
        base.parent,
        "bad.yaml",
        f"""
        spec: base.yaml
        sweep:
          axes:
            {axis}:
              - {"cbam" if "insert" in axis else "[layer4]"}
              - {bad}  # <-
        """,
    )
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if MARK in text)
    with pytest.raises(SpecError) as info:
        check_variants(load_sweep(path), (), base.parent / "runs", warn=lambda text: None)
    err = info.value
    assert (err.file, err.line) == (str(path), line), str(err)
    assert err.problem.startswith("variant ") and problem in str(err), str(err)


# --------------------------------------------------------------------------- one trial, one worker
POP = """
import json, sys, time
from pathlib import Path
import optuna
from surgery.sweep import open_storage
study = optuna.load_study(study_name="race", storage=open_storage(sys.argv[1], 60, 180))
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
taken = []
while (trial_id := study._pop_waiting_trial_id()) is not None:
    taken.append(trial_id)
print(json.dumps(taken))
"""


def test_two_processes_never_take_the_same_sqlite_trial(tmp_path: Path) -> None:
    """pysqlite begins a transaction only at its first write, so without `BEGIN IMMEDIATE` two
    processes both read a trial as WAITING and both set it RUNNING (seen here: 23 of 300)."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url, 60, 180))
    for i in range(40):
        study.enqueue_trial({"i": i})
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", POP, url, str(tmp_path / f"ready{i}"), str(go)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs), "a popping process died"
        time.sleep(0.05)
    go.touch()
    taken = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == sorted(t._trial_id for t in study.get_trials())


# --------------------------------------------------------------------------- workers
def grid_sweep(folder: Path, *, name: str, epochs: int = 1, batches: int = 2, seeds: int = 2, grace: int = 4) -> Path:
    write(folder, "base.yaml", BASE)
    return write(
        folder,
        "sweep.yaml",
        f"""
        name: {name}
        spec: base.yaml
        set: {{train.epochs: {epochs}, train.limit_batches: {batches}}}
        sweep:
          axes:
            surgery.0.at: {{l4: [layer4], l34: [layer3, layer4]}}
            seed: {list(range(seeds))}
          heartbeat: {{interval: 1, grace: {grace}}}
        """,
    )


def finished(study: optuna.Study) -> dict[str, list]:
    """Each variant's COMPLETE trials."""
    out: dict[str, list] = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        out.setdefault(t.user_attrs["variant"], []).append(t)
    return out


def epochs_trained(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "storage",
    [
        None,
        pytest.param(
            POSTGRES,
            id="postgres",
            marks=pytest.mark.skipif(
                not POSTGRES, reason="SURGERY_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server)"
            ),
        ),
    ],
    ids=["sqlite", "postgres"],
)
def test_two_workers_train_each_variant_of_a_grid_once(tmp_path: Path, storage: str | None) -> None:
    name = f"grid-{uuid.uuid4().hex[:8]}"  # a shared PostgreSQL database keeps every study
    path = grid_sweep(tmp_path, name=name)
    out = tmp_path / "runs" / name
    assert sweep_command(str(path), workers=2, out=str(out), storage=storage, console=quiet()) == 0

    url = storage or f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=name, storage=open_storage(url, 60, 180))
    done = finished(study)
    assert sorted(done) == ["at-l34_seed-0", "at-l34_seed-1", "at-l4_seed-0", "at-l4_seed-1"]
    assert all(len(trials) == 1 for trials in done.values())
    report = json.loads((out / "sweep.json").read_text())
    assert report["storage"] == (storage or url) and report["counts"]["complete"] == 4
    for row in report["variants"]:
        run_dir = out / row["variant"]
        assert epochs_trained(run_dir) == [0]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert row["value"] == summary["best_val_acc"] == done[row["variant"]][0].value
        assert row["label"] == row["variant"].rsplit("_seed-", 1)[0] and row["seed"] == summary_seed(run_dir)
    # the comparison: one row per label, the mean and spread of its two seeds, best first
    compared = json.loads((out / "comparison.json").read_text())["variants"]
    assert sorted(v["label"] for v in compared) == ["at-l34", "at-l4"]
    for variant in compared:
        values = [r["value"] for r in report["variants"] if r["label"] == variant["label"]]
        assert variant["best"]["n"] == 2 and variant["best"]["mean"] == pytest.approx(sum(values) / 2)
    assert compared[0]["best"]["mean"] >= compared[1]["best"]["mean"]
    assert "at-l34" in (out / "comparison.md").read_text() and (out / "comparison.html").is_file()

    # the same command again: nothing left to train, nothing trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    trials = len(study.get_trials())  # 4, or more if a busy machine starved a heartbeat (each still ran once)
    assert sweep_command(str(path), workers=2, out=str(out), storage=storage, console=quiet()) == 0
    assert len(study.get_trials()) == trials
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == stamps


def summary_seed(run_dir: Path) -> int:
    import yaml

    return yaml.safe_load((run_dir / "spec.yaml").read_text())["seed"]


def test_a_killed_worker_s_variant_is_resumed_by_another_and_trained_once(tmp_path: Path) -> None:
    name = "kill"
    epochs = 3
    path = grid_sweep(tmp_path, name=name, epochs=epochs, batches=4, seeds=1, grace=3)
    out = tmp_path / "runs" / name
    killed: dict[str, int] = {}

    def kill_one_mid_variant() -> None:
        """SIGKILL the worker holding a run that has a checkpoint but no summary yet."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for lock in out.glob(".*.lock"):
                run_dir = out / lock.name[1 : -len(".lock")]
                text = lock.read_text() if lock.exists() else ""
                if (
                    (run_dir / "checkpoints" / "last.pt").exists()
                    and not (run_dir / "summary.json").exists()
                    and text.startswith("pid ")
                ):
                    pid = int(text.split()[1])
                    assert pid != os.getpid()
                    os.kill(pid, signal.SIGKILL)
                    killed[run_dir.name] = pid
                    return
            time.sleep(0.02)

    monitor = threading.Thread(target=kill_one_mid_variant, daemon=True)
    monitor.start()
    assert sweep_command(str(path), workers=2, out=str(out), console=quiet()) == 0
    monitor.join()
    assert killed, "no worker was caught mid-variant"

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    done = finished(study)
    assert sorted(done) == ["at-l34_seed-0", "at-l4_seed-0"] and all(len(t) == 1 for t in done.values())
    (variant,) = killed
    resumed = done[variant][0]
    assert resumed.user_attrs["resumed_from_epoch"] >= 1  # continued from last.pt, not from scratch
    assert "failed_trial" in resumed.system_attrs  # the retry Optuna queued for the dead worker's trial
    assert study.trials[resumed.system_attrs["failed_trial"]].state == optuna.trial.TrialState.FAIL
    for run_dir in (out / v for v in done):
        assert epochs_trained(run_dir) == list(range(epochs))  # every epoch once
    report = json.loads((out / "sweep.json").read_text())
    assert {r["variant"]: r["state"] for r in report["variants"]} == {v: "COMPLETE" for v in done}


def test_an_interrupted_random_search_resumes_its_trial_with_the_same_values(tmp_path: Path) -> None:
    """Ctrl-C: the run checkpoints, its trial is queued again with the values drawn for it, and the
    same command resumes that run directory. (One worker runs in this process: SIGINT reaches it.)"""
    write(tmp_path, "base.yaml", BASE)
    path = write(
        tmp_path,
        "search.yaml",
        """
        name: search
        spec: base.yaml
        set: {train.epochs: 4, train.limit_batches: 3}
        sweep:
          sampler: random
          trials: 1
          axes: {surgery.0.insert: [cbam, se]}
          ranges:
            train.optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        """,
    )
    out = tmp_path / "runs" / "search"
    run_dir = out / "trial-0000"
    sent: list[bool] = []
    running = threading.Event()

    def interrupt_after_the_first_epoch() -> None:
        while running.is_set() and not sent:
            if (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "summary.json").exists():
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.02)

    running.set()
    monitor = threading.Thread(target=interrupt_after_the_first_epoch, daemon=True)
    monitor.start()
    try:
        assert sweep_command(str(path), out=str(out), console=quiet()) == 130
    finally:
        running.clear()
        monitor.join()
    assert sent
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    stopped, queued = study.get_trials()
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["error"] == "interrupted"
    assert queued.state == optuna.trial.TrialState.WAITING and queued.user_attrs["variant"] == "trial-0000"

    assert sweep_command(str(path), out=str(out), console=quiet()) == 0
    (done,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert done.params == stopped.params and 1.0e-4 <= done.params["train.optimizer.lr"] <= 1.0e-2
    assert done.user_attrs["resumed_from_epoch"] >= 1
    assert epochs_trained(run_dir) == [0, 1, 2, 3]
    import yaml

    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["train"]["optimizer"]["lr"] == done.params["train.optimizer.lr"]
    assert spec["surgery"][0]["insert"] == done.params["surgery.0.insert"]


# --------------------------------------------------------------------------- pruning
def test_a_pruner_stops_a_clearly_worse_variant_and_a_rerun_does_not_train_it_again(tmp_path: Path) -> None:
    """Successive halving at epoch 2: the variant whose lr cannot move the weights is behind the
    one trained before it, so it stops there, finished and readable, recorded as PRUNED and kept
    out of the comparison; the same command again trains nothing."""
    write(tmp_path, "base.yaml", BASE)
    path = write(
        tmp_path,
        "sweep.yaml",
        """
        name: prune
        spec: base.yaml
        set: {train.epochs: 3, train.limit_batches: 6}
        sweep:
          axes:
            train.optimizer.lr: {good: 3.0e-3, absurd: 1.0e-9}
          heartbeat: {interval: 1, grace: 4}
          prune: {pruner: successive_halving, min_epochs: 2, reduction_factor: 2}
        """,
    )
    out = tmp_path / "runs" / "prune"
    console = quiet()
    assert sweep_command(str(path), out=str(out), console=console) == 0  # a pruned variant is no failure
    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{out / 'study.db'}")
    states = {t.user_attrs["variant"]: t.state for t in study.get_trials()}
    assert states == {"lr-good": optuna.trial.TrialState.COMPLETE, "lr-absurd": optuna.trial.TrialState.PRUNED}
    assert study.best_trial.user_attrs["variant"] == "lr-good"

    # the run directory: finished, with the last epoch trained, marked as pruned
    pruned = out / "lr-absurd"
    assert epochs_trained(pruned) == [0, 1]
    summary = json.loads((pruned / "summary.json").read_text())
    assert summary["pruned"]["after_epoch"] == 1 and summary["pruned"]["epochs"] == 3 and summary["epochs"] == 2
    assert "SuccessiveHalvingPruner" in summary["pruned"]["why"]
    assert all((pruned / f).is_file() for f in ("model.safetensors", "report.html", "plots/curves.png"))
    assert epochs_trained(out / "lr-good") == [0, 1, 2]

    # sweep.json and the closing table show it apart, never ranked
    report = json.loads((out / "sweep.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["lr-absurd"]["state"] == "PRUNED" and rows["lr-absurd"]["pruned_after_epoch"] == 2
    assert rows["lr-good"]["state"] == "COMPLETE" and "pruned_after_epoch" not in rows["lr-good"]
    assert report["counts"]["pruned"] == 1 and report["prune"]["pruner"] == "successive_halving"
    assert all(r["cpu_seconds"] > 0 for r in rows.values())
    compared = json.loads((out / "comparison.json").read_text())["variants"]
    assert [v["label"] for v in compared] == ["lr-good"]
    printed = console.file.getvalue()
    assert "pruned, not compared (1)" in printed and "lr-absurd: after epoch 2" in printed

    # the same command again: nothing trained, the pruned point not run again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    assert sweep_command(str(path), out=str(out), console=quiet()) == 0
    assert len(study.get_trials()) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == stamps


def test_min_epochs_that_leave_nothing_to_prune_are_refused_at_their_line(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    path = write(
        tmp_path,
        "sweep.yaml",
        """
        spec: base.yaml
        sweep:
          axes: {seed: [0, 1]}
          prune:
            pruner: hyperband
            min_epochs: 1  # <-
        """,
    )
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if MARK in text)
    with pytest.raises(SpecError) as info:
        check_variants(load_sweep(path), (), tmp_path / "runs", warn=lambda text: None)
    assert (info.value.file, info.value.line) == (str(path), line)
    assert "leaves nothing to prune" in info.value.problem


@pytest.mark.parametrize(
    "pruner, optuna_class",
    [
        ("successive_halving", "SuccessiveHalvingPruner"),
        ("hyperband", "HyperbandPruner"),
        ("median", "MedianPruner"),
    ],
)
def test_each_pruner_is_optuna_s_own(pruner: str, optuna_class: str) -> None:
    from surgery.sweep import Prune, make_pruner

    made = make_pruner(Prune(pruner=pruner, min_epochs=2), epochs=8)
    assert type(made) is getattr(optuna.pruners, optuna_class)
    assert make_pruner(Prune(), epochs=8) is None


@pytest.mark.parametrize(
    "device, visible, gpus, expected",
    [
        ("auto", None, 2, ["0", "1", "0"]),  # round robin over the GPUs
        (None, "4,5", 8, ["4", "5", "4"]),  # within what CUDA_VISIBLE_DEVICES already allows
        ("cuda", None, 1, ["0", "0", "0"]),
        ("cpu", None, 2, [None, None, None]),
        ("cuda:1", None, 2, [None, None, None]),  # a spec that names its GPU keeps it
        ("auto", None, 0, [None, None, None]),
    ],
)
def test_each_worker_gets_a_gpu_or_a_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch, device: str | None, visible: str | None, gpus: int, expected: list
) -> None:
    import torch

    from surgery.sweep.worker import worker_environments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    envs = worker_environments(3, device)
    assert [env.get("CUDA_VISIBLE_DEVICES") for env in envs] == expected
    assert {env["OMP_NUM_THREADS"] for env in envs} == {"4"}


def test_a_path_in_a_sweep_file_is_relative_to_the_sweep_file(tmp_path: Path) -> None:
    from surgery.spec import load_spec

    (tmp_path / "specs").mkdir()
    write(tmp_path / "specs", "base.yaml", BASE)
    sweep = load_sweep(
        write(
            tmp_path,
            "weights.yaml",
            """
        spec: specs/base.yaml
        sweep:
          axes:
            model.pretrained: {a: weights/a.safetensors, b: weights/b.safetensors}
        """,
        )
    )
    variant = sweep.grid()[1]
    spec = load_spec(sweep.spec, variant.overrides)
    assert (
        spec.resolve_path(spec.model.pretrained, ("model", "pretrained"))
        == tmp_path.resolve() / "weights/b.safetensors"
    )
    assert (
        spec.resolve_path("labels.csv") == (tmp_path / "specs").resolve() / "labels.csv"
    )  # the spec's own: its folder


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "examples").rglob("sweep-*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_files_load_with_every_variant(path: Path) -> None:
    """Every variant's spec loads (building them needs the runs they load weights from)."""
    from surgery.spec import load_spec

    sweep = load_sweep(path)
    variants = sweep.grid() if sweep.sampler == "grid" else []
    assert len({v.name for v in variants}) == len(variants)
    for variant in variants:
        assert load_spec(sweep.spec, [*sweep.set, *variant.overrides]).name == variant.name


def test_a_study_made_from_another_sweep_is_refused(base: Path) -> None:
    from surgery.sweep import open_study

    sweep = load_sweep(
        write(
            base.parent,
            "s.yaml",
            """
        name: refused
        spec: base.yaml
        sweep: {axes: {seed: [0, 1]}}
        """,
        )
    )
    storage = open_storage(f"sqlite:///{base.parent / 'study.db'}", 20, 60)
    study = open_study(sweep, storage, "digest-a", print, lambda: sweep.grid())
    assert [t.user_attrs["variant"] for t in study.get_trials()] == ["seed-0", "seed-1"]
    assert open_study(sweep, storage, "digest-a", print).get_trials() == study.get_trials()  # continued
    with pytest.raises(SpecError, match="made from another sweep") as info:
        open_study(sweep, storage, "digest-b", print)
    assert info.value.file == sweep.file and "name:" in info.value.hint


def test_a_variant_that_fails_is_reported_and_the_others_still_train(tmp_path: Path) -> None:
    path = grid_sweep(tmp_path, name="fails", seeds=1)
    out = tmp_path / "runs" / "fails"
    out.mkdir(parents=True)
    (out / "at-l34_seed-0").write_text("a file where the run directory goes")
    assert sweep_command(str(path), out=str(out), console=quiet()) == 1
    report = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["variants"]}
    assert report["at-l4_seed-0"]["state"] == "COMPLETE"
    assert report["at-l34_seed-0"]["state"] == "FAIL" and "is a file" in report["at-l34_seed-0"]["error"]


def test_a_grid_trial_stopped_before_its_values_were_drawn_is_queued_as_the_same_variant(base: Path) -> None:
    from surgery.sweep import open_study
    from surgery.sweep.worker import Worker, requeue

    sweep = load_sweep(
        write(
            base.parent,
            "s.yaml",
            """
        spec: base.yaml
        sweep: {axes: {surgery.0.at: {l4: [layer4], l34: [layer3, layer4]}}}
        """,
        )
    )
    study = open_study(
        sweep, open_storage(f"sqlite:///{base.parent / 'study.db'}", 20, 60), "d", print, lambda: sweep.grid()
    )
    trial_id = study._pop_waiting_trial_id()
    worker = Worker(sweep, study, base.parent, base.parent, (), None, quiet(), "surgery sweep s.yaml", "study.db")
    requeue(worker, trial_id, "interrupted")
    first, second, again = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL and first.params == {}  # stopped before suggesting
    assert again.state == optuna.trial.TrialState.WAITING
    assert again.system_attrs["fixed_params"] == first.system_attrs["fixed_params"] == {"surgery.0.at": "l4"}
    assert again.user_attrs["variant"] == first.user_attrs["variant"] == "at-l4"


def test_a_signal_while_a_trial_is_taken_waits_for_its_heartbeat() -> None:
    from surgery.sweep.worker import hold_signals, release_signals

    before = signal.getsignal(signal.SIGINT)
    held = hold_signals()
    os.kill(os.getpid(), signal.SIGINT)  # noted: no KeyboardInterrupt here
    time.sleep(0.05)
    with pytest.raises(KeyboardInterrupt):
        release_signals(held)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_missing_sweep_file_is_named_as_a_sweep_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_sweep(str(tmp_path / "sweep-cbam.yaml"))
    assert info.value.problem == "the sweep file does not exist" and "a YAML sweep file" in info.value.expected


def test_a_locked_study_is_waited_for_aloud_and_given_up_after_the_lock_timeout(
    base: Path, capsys: pytest.CaptureFixture
) -> None:
    import sqlite3

    from surgery.cli import main

    path = write(
        base.parent,
        "locked.yaml",
        """
        name: locked
        spec: base.yaml
        sweep: {axes: {seed: [0, 1]}}
        """,
    )
    out = base.parent / "runs" / "locked"
    out.mkdir(parents=True)
    holder = sqlite3.connect(out / "study.db", isolation_level=None)  # another process's exclusive transaction
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        code = main(["sweep", str(path), "--out", str(out), "--lock-timeout", "1.5"])
        took = time.monotonic() - start
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    db = str((out / "study.db").resolve())
    assert code == 1 and took < 30, err
    assert f"waiting for {db}: another process holds the study's database locked" in err
    assert f"{db} stayed locked by another process for 1.5 s" in err and "--lock-timeout" in err


def test_a_variant_killed_while_writing_its_final_files_gets_them_without_training_again(base: Path) -> None:
    """Killed after summary.json, before its plots and report.html: the retake draws them from the
    run's records (summary.json, metrics.jsonl, classes.json) and trains nothing."""
    path = write(
        base.parent,
        "final.yaml",
        """
        name: final
        spec: base.yaml
        sweep: {axes: {seed: [0]}}
        """,
    )
    out = base.parent / "runs" / "final"
    assert sweep_command(str(path), out=str(out), console=quiet()) == 0
    run_dir = out / "seed-0"
    drawn = ["report.html", "plots/curves.png", "plots/confusion.png"]
    for name in drawn:
        (run_dir / name).unlink()
    (out / "study.db").unlink()  # its trial is taken again, as after its worker was found dead
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "metrics.jsonl", run_dir / "model.safetensors")}
    console = quiet()
    assert sweep_command(str(path), out=str(out), console=console) == 0
    assert all((run_dir / name).is_file() for name in drawn)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not trained again
    assert "already trained" in console.file.getvalue() and "wrote plots/curves.png" in console.file.getvalue()
    study = optuna.load_study(study_name="final", storage=f"sqlite:///{out / 'study.db'}")
    (trial,) = study.get_trials()
    assert trial.user_attrs["reused_finished_run"] and trial.state == optuna.trial.TrialState.COMPLETE
