"""Settings chosen by measurement (`surgery.train.autotune`): which candidates are timed, how the
choice is made, recorded and cached, and that the trial leaves the run's numerics alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import run_logged

from surgery.spec import load_spec
from surgery.train import autotune, prepare
from surgery.train.autotune import Candidate, candidates, pick
from surgery.train.runner import resumed_settings
from surgery.train.runtime import rng_state

TINY = {
    "name": "tiny-tune",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "surgery": [{"insert": "cbam", "at": ["layer3"], "init": "identity"}],
    "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


def _spec(**train):
    return load_spec({**TINY, "train": {**TINY["train"], **train}})


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "surgery" / "tuning"


@pytest.fixture
def no_trial(monkeypatch):
    """Fail the test if a trial runs."""

    def refuse(*a, **k):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(autotune, "trial", refuse)


def _labels(cands):
    return [c.label for c in cands]


def test_explicit_settings_fix_their_axis_and_auto_precision_is_never_timed_lower():
    assert _labels(candidates("cpu", "auto", "auto", False)) == ["fp32, channels_last on", "fp32, channels_last off"]
    assert candidates("cpu", False, "auto", "auto") == [Candidate(False, "fp32", False)]  # compile auto: off the GPU
    assert candidates("cpu", True, "bf16", False) == [Candidate(True, "bf16", False)]
    # lower precision is a candidate only with `fastest`
    for device in ("cpu", "cuda"):
        for layout in ("auto", True, False):
            precisions = {c.precision for c in candidates(device, layout, "auto", "auto")}
            assert precisions == ({"bf16"} if device == "cuda" else {"fp32"})  # auto's rule, one value, untimed
    assert {c.precision for c in candidates("cpu", False, "fastest", False)} == {"fp32", "bf16"}


def test_the_cuda_candidate_list_is_built_here_though_not_run():
    cands = candidates("cuda", "auto", "fastest", "auto", bf16=True)
    assert len(cands) == 2 * 3 * 2  # layouts x (fp32, bf16, fp16) x (eager, compiled)
    assert {c.precision for c in candidates("cuda", True, "fastest", False, bf16=False)} == {"fp32", "fp16"}
    assert {c.compile for c in cands} == {False, True}


def test_a_compiled_candidate_wins_only_when_its_saving_pays_for_its_compilation():
    eager, compiled = Candidate(True, "bf16", False), Candidate(True, "bf16", True)
    times = {eager.label: [0.10, 0.11], compiled.label: [0.08, 0.09]}
    warm = {eager.label: 0.2, compiled.label: 30.08}  # 30 s of compilation, 0.02 s saved per step
    assert pick([eager, compiled], times, warm, total_steps=1000) == (eager, pytest.approx(30.0))
    assert pick([eager, compiled], times, warm, total_steps=2000)[0] == compiled
    # without compilation the fastest step decides
    assert pick([eager], times, warm, 1)[0] == eager


def test_the_trial_leaves_model_and_random_state_untouched(cache):
    spec = _spec(channels_last="auto")
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    rng = rng_state()
    tuning = autotune.tune(
        model,
        candidates("cpu", "auto", "auto", False),
        x,
        lambda m: torch.optim.Adam(m.parameters(), lr=0.1),
        surgery=spec.raw["surgery"],
        total_steps=10,
    )
    assert tuning.source == "trial" and len(tuning.timings) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng["torch"], torch.get_rng_state())
    assert next(model.parameters()).is_contiguous()  # the model itself was not converted


def test_auto_times_records_and_caches_the_choice_and_a_resume_keeps_it(cache, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(autotune, "ROUNDS", 1)  # one timed round: quick on a busy machine, and
    monkeypatch.setattr(autotune, "BUDGET_SECONDS", 600.0)  # never cut short by one (a slow step)
    log = run_logged(TINY, tmp_path / "a")
    record = json.loads((tmp_path / "a" / "tuning.json").read_text())
    assert record["source"] == "trial" and record["trial_seconds"] > 0
    assert set(record["candidates"]) == {"fp32, channels_last on", "fp32, channels_last off"}
    assert all(c["seconds_per_step"] for c in record["candidates"].values())
    chosen = Candidate(**record["chosen"])
    fastest = min(record["candidates"], key=lambda label: record["candidates"][label]["fastest"])
    assert chosen.label == fastest and chosen.precision == "fp32"
    assert "settings by measurement: " + chosen.label in log and "trial of" in log
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["channels_last"] == chosen.channels_last
    assert len(list(cache.glob("*.json"))) == 1
    # the second run of the same set-up takes the cached decision: no trial
    monkeypatch.setattr(autotune, "trial", lambda *a, **k: pytest.fail("a trial ran"))
    log = run_logged(TINY, tmp_path / "b")
    record_b = json.loads((tmp_path / "b" / "tuning.json").read_text())
    assert record_b["source"] == "cache" and record_b["chosen"] == record["chosen"] and "cached trial" in log
    # a resume keeps the run's own choice, whatever the cache says now
    assert resumed_settings(tmp_path / "a") == chosen
    for path in cache.glob("*.json"):
        path.unlink()
    ctx = prepare(load_spec(TINY), settings=chosen)
    assert ctx.tuning.source == "resumed" and ctx.runtime.channels_last == chosen.channels_last
    # a run from before tuning.json resumes with what `auto` meant then (channels_last on)
    (tmp_path / "a" / "tuning.json").unlink()
    assert resumed_settings(tmp_path / "a") == "provisional"
    assert resumed_settings(tmp_path / "nothing") is None
    ctx = prepare(load_spec(TINY), settings="provisional")
    assert ctx.tuning.source == "resumed" and ctx.runtime.channels_last is True


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"channels_last": False}, Candidate(False, "fp32", False)),
        ({"channels_last": True, "precision": "bf16"}, Candidate(True, "bf16", False)),
        ({"channels_last": False, "compile": "auto"}, Candidate(False, "fp32", False)),
    ],
)
def test_explicit_settings_win_without_a_trial(cache, no_trial, train, expected):
    ctx = prepare(_spec(**train))
    assert ctx.tuning.source == "explicit" and ctx.tuning.chosen == expected
    assert (ctx.runtime.channels_last, ctx.runtime.precision, ctx.runtime.compile) == (
        expected.channels_last,
        expected.precision,
        expected.compile,
    )
    assert not cache.exists()


def test_fastest_may_pick_bf16_and_auto_never_does(cache, monkeypatch):
    """A trial where bf16 measures fastest: `fastest` takes it, `auto` never even times it."""

    def fake(model, cands, x, make_optimizer, **kw):
        times = {c.label: [0.01 if c.precision == "bf16" else 0.02] for c in cands}
        return times, {label: 0.02 for label in times}

    monkeypatch.setattr(autotune, "trial", fake)
    assert prepare(_spec(channels_last=False, precision="fastest")).runtime.precision == "bf16"
    ctx = prepare(_spec(precision="auto"))
    assert ctx.runtime.precision == "fp32"
    assert {Candidate(**json.loads(p.read_text())["chosen"]).precision for p in cache.glob("*.json")} == {
        "bf16",
        "fp32",
    }


def test_an_unreadable_cache_entry_means_a_new_trial(cache, monkeypatch):
    calls = []

    def fake(model, cands, x, make_optimizer, **kw):
        calls.append(1)
        return {c.label: [0.01 * (i + 1)] for i, c in enumerate(cands)}, {c.label: 0.0 for c in cands}

    monkeypatch.setattr(autotune, "trial", fake)
    prepare(_spec())
    for path in cache.glob("*.json"):
        path.write_text("{oops")
    assert prepare(_spec()).tuning.source == "trial" and len(calls) == 2
    assert prepare(_spec()).tuning.source == "cache" and len(calls) == 2


def test_a_failed_trial_falls_back_to_the_provisional_settings_and_is_not_cached(cache, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(autotune, "trial", fail)
    ctx = prepare(_spec())
    assert ctx.tuning.source.startswith("fallback: the trial failed (RuntimeError: out of memory")
    assert ctx.runtime.channels_last is True  # the first candidate: what `auto` meant before a measurement
    assert "the trial failed" in ctx.tuning.describe()
    assert not list(cache.glob("*.json"))


def test_a_trial_longer_than_its_budget_is_cut_short(cache, monkeypatch):
    """A step so slow that two per candidate exceed the budget: one step, then the provisional settings."""
    monkeypatch.setattr(autotune, "BUDGET_SECONDS", 0.0)
    calls = []
    real = autotune._setup

    def counting(*a, **k):
        step = real(*a, **k)
        return lambda: calls.append(1) or step()

    monkeypatch.setattr(autotune, "_setup", counting)
    ctx = prepare(_spec())
    assert ctx.tuning.source.startswith("fallback: one step takes") and len(calls) == 2  # warm-up, one timed
    assert ctx.tuning.record()["candidates"] == {} and ctx.runtime.channels_last is True
    # cached like a finished trial: the next run of the set-up makes the same choice, without a step
    again = prepare(_spec())
    assert again.tuning.source == "cache" and again.runtime.channels_last is True and len(calls) == 2
