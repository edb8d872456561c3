"""Event-driven unfreezing: `unfreeze_at: {plateau: ...}` and `{after: GROUP, epochs: N}`.

The rules only decide *when* a group starts: a run whose rule fired at epoch E must be the run a
plain `unfreeze_at: E` would have given, bit for bit (warm-up, lr tables, head-only feature cache
and early stopping included), and a run resumed after the rule fired keeps that epoch from its
checkpoint. Early stopping waits until no group is waiting to unfreeze.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
from rich.console import Console
from runs import run_logged

from surgery.cli import main
from surgery.errors import SpecError
from surgery.model.views import schedule_rich
from surgery.runs import load_safetensors, read_metrics
from surgery.spec import load_spec
from surgery.train import TrainingStopped
from surgery.train.schedule import Unfreezing, earliest_epochs, schedule_table, unfreeze_epochs, unfreeze_events

MARK = "# <-"
TIMING = ("images_per_sec", "seconds", "data_wait_fraction")
HEAD = """\
model: {backbone: "timm:resnet10t", pretrained: false, num_classes: 10}
data: {name: digits, image_size: 32}
train: {epochs: 6}
"""


def _marked_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if MARK in line)


# ------------------------------------------------------------------ located errors
ERRORS = [  # (id, groups YAML with the offending line marked, key path, substring of problem or hint)
    (
        "unknown-group",
        """
        - {name: head, params: ["@head"]}
        - {name: body, params: ["*"], unfreeze_at: {after: haed, epochs: 2}}  # <-
        """,
        "groups[1].unfreeze_at.after",
        "'head'",
    ),
    (
        "cycle",
        """
        - {name: head, params: ["@head"]}
        - {name: top, params: [layer4], unfreeze_at: {after: body, epochs: 1}}  # <- the first group of the cycle
        - {name: body, params: ["*"], unfreeze_at: {after: top, epochs: 1}}
        """,
        "groups[1].unfreeze_at.after",
        "top -> body -> top",
    ),
    (
        "waits-for-itself",
        """
        - {name: head, params: ["@head"]}
        - {name: body, params: ["*"], unfreeze_at: {after: body, plateau: {}}}  # <-
        """,
        "groups[1].unfreeze_at.after",
        "body -> body",
    ),
    (
        "root-never-unfreezes",
        """
        - {name: head, params: ["@head"]}
        - {name: stem, params: [conv1], unfreeze_at: never}
        - {name: body, params: ["*"], unfreeze_at: {after: stem, epochs: 1}}  # <-
        """,
        "groups[2].unfreeze_at.after",
        "never unfreezes",
    ),
    (
        "epochs-without-after",
        """
        - {name: head, params: ["@head"]}
        - {name: body, params: ["*"], unfreeze_at: {epochs: 3}}  # <-
        """,
        "groups[1].unfreeze_at.epochs",
        "unfreeze_at: 3",
    ),
    (
        "epochs-and-plateau",
        """
        - {name: head, params: ["@head"]}
        - {name: body, params: ["*"], unfreeze_at: {after: head, epochs: 1, plateau: {}}}  # <-
        """,
        "groups[1].unfreeze_at.epochs",
        "not both",
    ),
    (
        "after-alone",
        """
        - {name: head, params: ["@head"]}
        - {name: body, params: ["*"], unfreeze_at: {after: head}}  # <-
        """,
        "groups[1].unfreeze_at",
        "neither",
    ),
    (
        "map-in-single-label",
        """
        - {name: head, params: ["@head"]}
        - name: body
          params: ["*"]
          unfreeze_at: {plateau: {monitor: val_map}}  # <-
        """,
        "groups[1].unfreeze_at.plateau.monitor",
        "multi-label",
    ),
    (
        "misspelt-monitor",
        """
        - {name: head, params: ["@head"]}
        - name: body
          params: ["*"]
          unfreeze_at: {plateau: {monitor: val_los}}  # <-
        """,
        "groups[1].unfreeze_at.plateau.monitor",
        "'val_loss'",
    ),
    (
        "zero-patience",
        """
        - {name: head, params: ["@head"]}
        - name: body
          params: ["*"]
          unfreeze_at: {plateau: {patience: 0}}  # <-
        """,
        "groups[1].unfreeze_at.plateau.patience",
        "minimum",
    ),
]


@pytest.mark.parametrize("groups,path,words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_rule_mistakes_are_located(groups: str, path: str, words: str, tmp_path: Path) -> None:
    text = HEAD + "groups:\n" + textwrap.indent(textwrap.dedent(groups).strip("\n"), "  ") + "\n"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    err = info.value
    assert err.path == path, str(err)
    assert (err.file, err.line) == (str(spec_file), _marked_line(text)), str(err)
    assert words in err.problem + (err.hint or ""), str(err)


def test_validate_cli_reports_a_rule_mistake_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (
        HEAD
        + "groups:\n  - {name: head, params: ['@head']}\n"
        + "  - {name: body, params: ['*'], unfreeze_at: {after: nope, epochs: 1}}\n"
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    assert main(["validate", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert f"{spec_file}:6:" in err and "groups[1].unfreeze_at.after" in err and "'nope'" in err
    assert "expected: one of head\n" in err  # the other groups: a group cannot wait for itself


# ------------------------------------------------------------------ the rules, without training
def _spec(groups: list[dict], epochs: int = 10, **train) -> object:
    return load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "pretrained": False},
            "train": {"epochs": epochs, **train},
            "groups": groups,
        }
    )


CHAIN = [
    {"name": "new", "params": ["@head"]},
    {"name": "top", "params": ["layer4"], "unfreeze_at": {"after": "new", "epochs": 3}},
    {"name": "mid", "params": ["layer3"], "unfreeze_at": {"after": "top", "plateau": {"patience": 2}}},
    {"name": "base", "params": ["*"], "unfreeze_at": {"after": "mid", "epochs": 1}},
]


def test_after_chains_rooted_in_a_plain_epoch_are_known_before_the_run() -> None:
    spec = _spec(CHAIN)
    assert unfreeze_epochs(spec) == {"new": 0, "top": 3, "mid": None, "base": None}
    # mid watches from top's epoch (3): a first value, then 2 epochs without improvement
    assert earliest_epochs(spec) == {"new": 0, "top": 3, "mid": 3 + 2 + 1, "base": 3 + 2 + 1 + 1}
    assert unfreeze_epochs(spec, {"mid": 8}) == {"new": 0, "top": 3, "mid": 8, "base": 9}
    assert unfreeze_events(spec) == {0: ["new"], 3: ["top"]}


def test_plateau_rule_fires_after_patience_and_its_chain_follows() -> None:
    spec = _spec(CHAIN)
    unfreezing = Unfreezing(spec)
    losses = [2.0, 1.5, 1.2, 1.0, 0.9, 0.95, 0.91, 0.8]  # mid watches from epoch 3: best 1.0, 0.9; bad 0.95, 0.91
    fired_at = None
    for epoch, loss in enumerate(losses):
        fired = unfreezing.step(epoch, {"val_loss": loss, "val_acc": 0.0})
        if fired:
            assert fired == ["mid"] and fired_at is None
            fired_at = epoch
    assert fired_at == 6
    assert unfreezing.starts == {"new": 0, "top": 3, "mid": 7, "base": 8}
    assert unfreezing.waiting(6) == ["mid", "base"] and unfreezing.waiting(8) == []


def test_plateau_state_survives_a_round_trip_through_the_checkpoint_dict() -> None:
    spec = _spec(
        [
            {"name": "head", "params": ["@head"]},
            {
                "name": "body",
                "params": ["*"],
                "unfreeze_at": {"plateau": {"monitor": "val_acc", "patience": 3, "min_delta": 0.01}},
            },
        ]
    )
    # best 0.1, 0.3, then 0.35 (epoch 4); 0.305, 0.355 and 0.36 do not beat the best by more than 0.01
    values = [0.1, 0.3, 0.305, 0.2, 0.35, 0.355, 0.3, 0.36, 0.5]

    def fire(unfreezing: Unfreezing, epochs: range) -> list[int]:
        return [e for e in epochs if unfreezing.step(e, {"val_acc": values[e], "val_loss": 0.0})]

    straight = Unfreezing(spec)
    expected = fire(straight, range(len(values)))
    first = Unfreezing(spec)
    fire(first, range(6))  # stopped with one bad epoch counted
    resumed = Unfreezing(spec)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain data, as in last.pt
    assert fire(resumed, range(6, len(values))) == expected == [7]
    assert resumed.starts == straight.starts == {"head": 0, "body": 8}


def test_schedule_shows_the_rule_from_the_first_epoch_it_could_fire() -> None:
    spec = _spec(CHAIN, epochs=8)
    rows = schedule_table(spec)
    assert [r["groups"]["top"]["trainable"] for r in rows] == [False] * 3 + [True] * 5
    assert [r["groups"]["mid"]["trainable"] for r in rows] == [False] * 6 + [None] * 2
    assert rows[7]["groups"]["base"] == {"trainable": None, "lr": pytest.approx(1e-3), "rule": "after mid +1"}
    console = Console(file=io.StringIO(), width=200)
    console.print(schedule_rich(rows, [g.name for g in spec.groups]))  # what `inspect --schedule` prints
    out = console.file.getvalue()
    epoch_rows = [line for line in out.splitlines() if line.strip("│ ").split(" ")[0].isdigit()]
    assert len(epoch_rows) == 8
    assert "after top, plateau val_loss/2" in epoch_rows[6] and "after top" not in epoch_rows[5]
    assert "after mid +1" in epoch_rows[7] and "after mid" not in epoch_rows[6] and "frozen" in epoch_rows[6]


def test_a_rule_that_cannot_fire_in_time_is_a_located_warning() -> None:
    spec = _spec(
        [
            {"name": "head", "params": ["@head"]},
            {"name": "body", "params": ["*"], "unfreeze_at": {"plateau": {"patience": 4}}},
        ],
        epochs=4,
    )
    assert any("groups[1].unfreeze_at" in w and "epoch 5 at the earliest" in w for w in spec.warnings)


# ------------------------------------------------------------------ runs
RUN = {
    "name": "rules",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "train": {
        "epochs": 6,
        "batch_size": 16,
        "limit_batches": 2,
        "channels_last": False,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "early_stop": {"monitor": "val_acc", "patience": 1, "min_delta": 10},
    },
    "data": {"name": "digits", "image_size": 32, "num_workers": 0, "subset": {"train": 64, "val": 32}},
    # min_delta 10: no epoch improves on the first one, so the plateau fires after exactly `patience` epochs
    "groups": [
        {"name": "head", "params": ["@head"]},
        {
            "name": "top",
            "params": ["layer4"],
            "lr": 0.02,
            "warmup_epochs": 1,
            "unfreeze_at": {"plateau": {"monitor": "val_loss", "patience": 1, "min_delta": 10}},
        },
        {"name": "rest", "params": ["*"], "lr": {0: 0.01, 3: 0.005}, "unfreeze_at": {"after": "top", "epochs": 1}},
    ],
}
FIRES = 1  # the plateau's last epoch (0-based): the first value, then `patience` epochs without improvement
LAST_STAGE = FIRES + 2  # rest: one epoch after top
STOPS = LAST_STAGE + 1  # early stopping: the first value of the last stage, then `patience` epochs
EPOCHS = STOPS + 1  # epochs trained


@pytest.fixture(scope="module")
def rule_run(tmp_path_factory, one_thread) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("rules") / "run"
    return out, run_logged(RUN, out)


def _same_run(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    ref, got = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING + ignore} for r in rows]  # noqa: E731
    assert strip(got) == strip(ref)
    for name in ("model.safetensors", "checkpoints/best.safetensors"):
        x, y = load_safetensors(a / name), load_safetensors(b / name)
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), name


def test_the_rule_fires_and_every_row_records_the_unfreeze_epochs(rule_run) -> None:
    out, log = rule_run
    rows = read_metrics(out / "metrics.jsonl")
    top = FIRES + 1
    assert [r["trainable"]["top"] for r in rows] == [e >= top for e in range(EPOCHS)]
    assert [r["trainable"]["rest"] for r in rows] == [e >= top + 1 for e in range(EPOCHS)]
    assert [r["unfreeze_at"]["top"] for r in rows] == [None] * FIRES + [top] * (EPOCHS - FIRES)
    assert rows[-1]["unfreeze_at"] == {"head": 0, "top": top, "rest": top + 1}
    assert json.loads((out / "summary.json").read_text())["unfreeze_at"] == rows[-1]["unfreeze_at"]
    assert (
        f"epoch {FIRES + 1}: top unfreezes from epoch {top + 1}: its rule fired (plateau val_loss/1, min_delta 10)"
        in log
    )
    assert "head-only stage" in log  # epochs before the rule fired trained the head on cached features


def test_early_stopping_waits_for_the_last_stage(rule_run) -> None:
    """Patience 1 would stop the head-only stage after epoch 1; it counts from the last unfreeze."""
    out, log = rule_run
    record = json.loads((out / "summary.json").read_text())["early_stop"]
    assert (record["best_epoch"], record["epoch"]) == (LAST_STAGE, STOPS)
    assert len(read_metrics(out / "metrics.jsonl")) == EPOCHS < RUN["train"]["epochs"]
    assert f"early stop after epoch {STOPS + 1}/6" in log


def test_a_fired_rule_trains_exactly_like_a_plain_unfreeze_epoch(rule_run, tmp_path: Path) -> None:
    """Warm-up counted from the actual epoch, the lr table's absolute epochs, the feature cache."""
    out, _ = rule_run
    plain = copy.deepcopy(RUN)
    plain["groups"][1]["unfreeze_at"] = FIRES + 1
    plain["groups"][2]["unfreeze_at"] = LAST_STAGE
    run_logged(plain, tmp_path / "plain")
    # every figure, lr and weight the same; only `unfreeze_at` differs: a plain run knows it from epoch 0
    _same_run(out, tmp_path / "plain", ignore=("unfreeze_at",))
    assert read_metrics(tmp_path / "plain" / "metrics.jsonl")[0]["unfreeze_at"] == {"head": 0, "top": 2, "rest": 3}
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[FIRES + 1]["lr"]["top"] == pytest.approx(0.02 / 2)  # warm-up: 1/(W+1) in its first epoch
    assert rows[LAST_STAGE]["lr"]["rest"] == pytest.approx(0.005)


def test_resumed_after_the_rule_fired_keeps_its_epoch(rule_run, tmp_path: Path) -> None:
    out, _ = rule_run
    resumed = tmp_path / "resumed"

    def interrupt(epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == (LAST_STAGE, 0):  # after the rule fired, before the early stop, mid-epoch
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped):
        run_logged(RUN, resumed, on_step=interrupt)
    state_rows = read_metrics(resumed / "metrics.jsonl")
    assert len(state_rows) == LAST_STAGE and state_rows[-1]["unfreeze_at"]["top"] == FIRES + 1
    log = run_logged(RUN, resumed, resume=True)
    assert f"resuming rules at epoch {LAST_STAGE + 1}/6, batch 2" in log and "early stop" in log
    _same_run(out, resumed)
