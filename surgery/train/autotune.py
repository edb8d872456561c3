"""Settings chosen by measurement: ``train.channels_last: auto``, ``train.precision: fastest`` and
``train.compile: auto`` (on CUDA) are decided by timing a few training steps of the run's own
model, batch size and device under each candidate, the idea of cuDNN's benchmark mode.

    candidates(...)       the settings worth timing (pure: explicit settings fix their axis)
    tune(...)             the decision: from the cache, else from a trial; a `Tuning`
    cache_dir()           $XDG_CACHE_HOME/surgery/tuning (~/.cache/surgery/tuning)

The trial runs on deep copies of the model and fresh optimizers, and puts every global RNG back
afterwards, so the run's numerics and resume exactness are those of a run started with the chosen
settings written out. Each candidate gets one warm-up step, then the candidates take turns, one
timed step each, for a few rounds (stopping early once the trial has used its time budget); each
candidate's fastest step decides (other processes on the machine only ever add time, so the
fastest step is the cleanest measurement). Precision changes numerics, so a lower precision is a candidate only
with ``precision: fastest``; ``precision: auto`` keeps its rule (fp32 on the CPU, bf16 on CUDA,
fp16 where bf16 is missing). torch.compile is a candidate only on CUDA with ``compile: auto``,
and wins only when its measured saving over the run's steps pays for its measured compilation.

The decision is cached under a key made of the machine (CPU model, GPU name, threads), the torch
and timm versions, the model's architecture (the surgered model's structure and the spec's model
and surgery sections), the trainable set, the input shape, batch size, device and the candidates,
so a second run of the same set-up does not pay for the trial.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..files import write_json

ROUNDS = 3  # timed steps per candidate (fewer once the budget is spent)
BUDGET_SECONDS = 3.0  # the trial stops adding rounds after this long (each candidate keeps >= 1 step)
RUN_SHARE = 0.02  # ... or after this share of the run's estimated training time, when that is longer


class TooLong(RuntimeError):
    """Even the shortest trial (two steps per candidate) would cost more than its budget."""


@dataclass(frozen=True)
class Candidate:
    channels_last: bool
    precision: str
    compile: bool | str = False

    @property
    def label(self) -> str:
        compiled = f", compile {self.compile}" if self.compile else ""
        return f"{self.precision}, channels_last {'on' if self.channels_last else 'off'}{compiled}"


@dataclass
class Tuning:
    """What was decided, and how: ``source`` is 'explicit' (nothing to choose), 'trial', 'cache',
    'resumed' (a resumed run keeps its own), or 'fallback: ...' (the trial failed: the first
    candidate, never cached)."""

    chosen: Candidate
    source: str
    timings: dict[str, list[float]] = field(default_factory=dict)  # candidate label -> seconds per step
    seconds: float = 0.0  # how long the trial took (0 from the cache)
    key: str = ""
    compile_seconds: float | None = None

    def record(self) -> dict[str, Any]:
        """tuning.json: the choice, every candidate's step times and the trial's duration."""
        return {
            "chosen": asdict(self.chosen),
            "source": self.source,
            "trial_seconds": round(self.seconds, 3),
            "candidates": {
                label: {"seconds_per_step": [round(t, 6) for t in times], "fastest": round(min(times), 6)}
                for label, times in self.timings.items()
            },
            "compile_seconds": self.compile_seconds,
            "key": self.key,
        }

    def describe(self) -> str:
        """The log line: what was chosen, from what, and what it cost."""
        if self.source == "explicit":
            return ""
        if self.source == "resumed":
            return f"settings as the run started: {self.chosen.label}"
        steps = ", ".join(f"{label} {min(t) * 1000:.1f} ms" for label, t in self.timings.items())
        if self.source.startswith("fallback"):
            return f"settings: {self.chosen.label} ({self.source})"
        how = f"trial of {self.seconds:.1f} s" if self.source == "trial" else "cached trial, 0 s"
        return f"settings by measurement: {self.chosen.label} (fastest step: {steps}; {how})"


def candidates(
    device_type: str, channels_last: bool | str, precision: str, compile: bool | str, *, bf16: bool = True
) -> list[Candidate]:
    """The settings to time; an explicit setting fixes its axis. Pure.

    Args:
        device_type: 'cpu', 'cuda' or 'mps'.
        channels_last, precision, compile: ``spec.train``'s values.
        bf16: CUDA only: whether the GPU has bf16 (else fp16 stands in for it).

    Example:
        >>> [c.label for c in candidates("cpu", "auto", "fp32", False)]
        ['fp32, channels_last on', 'fp32, channels_last off']
    """
    layouts = [True, False] if channels_last == "auto" else [bool(channels_last)]
    cuda = device_type == "cuda"
    if precision == "auto":  # the documented rule, never a timed choice of lower precision
        precisions = [("bf16" if bf16 else "fp16") if cuda else "fp32"]
    elif precision == "fastest":
        precisions = ["fp32", *(["bf16"] if bf16 or not cuda else []), *(["fp16"] if cuda else [])]
    else:
        precisions = [precision]
    fixed = False if compile == "auto" else compile  # auto off the GPU: not compiled
    compiles: list[bool | str] = [False, True] if compile == "auto" and cuda else [fixed]
    return [Candidate(cl, p, c) for c in compiles for p in precisions for cl in layouts]


def cache_dir() -> Path:
    """Where decisions are kept: $XDG_CACHE_HOME/surgery/tuning, else ~/.cache/surgery/tuning."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "surgery" / "tuning"


def machine(device: torch.device) -> dict[str, Any]:
    """What the timings depend on besides the model: CPU model, GPU name, threads, versions."""
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def cache_key(
    model: nn.Module,
    surgery: Any,
    shape: Sequence[int],
    device: torch.device,
    cands: Sequence[Candidate],
    steps: int,
) -> str:
    """The cache key: machine, versions, model fingerprint (structure, surgery, trainable set),
    input shape (batch included), device and candidates."""
    trainable = "".join("1" if p.requires_grad else "0" for p in model.parameters())
    parts = {
        "machine": machine(device),
        "model": repr(model),
        "surgery": surgery,
        "trainable": hashlib.sha256(trainable.encode()).hexdigest(),
        "shape": list(shape),
        "device": str(device),
        "candidates": [asdict(c) for c in cands],
        "compile_steps": steps if any(c.compile for c in cands) else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read_cache(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or unreadable: measure again
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _write_cache(key: str, record: Mapping[str, Any]) -> None:
    try:
        write_json(cache_dir() / f"{key}.json", record)
    except Exception:  # noqa: BLE001 - a cache that cannot be written only costs the next run a trial
        pass


def _cached_times(
    record: Mapping[str, Any] | None, cands: Sequence[Candidate]
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[float]]] | None:
    """(times to pick from, warm-up seconds, measured times) of a cached decision; None when there
    is none for these candidates. A cached trial that was cut short has no times: its choice stands."""
    try:
        chosen = Candidate(**record["chosen"])  # type: ignore[index]
        measured = {label: list(v["seconds_per_step"]) for label, v in record["candidates"].items()}  # type: ignore[index]
    except (TypeError, KeyError, AttributeError):
        return None
    if chosen not in cands or (measured and set(measured) != {c.label for c in cands}):
        return None
    times = measured or {c.label: [0.0 if c == chosen else 1.0] for c in cands}
    warm = {label: float((record.get("warm") or {}).get(label, 0.0)) for label in times}  # type: ignore[union-attr]
    return times, warm, measured


# --------------------------------------------------------------------------- the trial
def _setup(
    model: nn.Module, c: Candidate, x: torch.Tensor, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
) -> Callable[[], float]:
    """One candidate's step on its own copy of the model and a fresh optimizer: returns seconds."""
    fmt = torch.channels_last if c.channels_last else torch.contiguous_format
    copy_ = copy.deepcopy(model).to(x.device, memory_format=fmt)
    copy_.train()
    optimizer = make_optimizer(copy_)
    forward = torch.compile(copy_, backend="inductor" if c.compile is True else str(c.compile)) if c.compile else copy_
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
    xs = x.contiguous(memory_format=fmt)
    cuda = x.device.type == "cuda"

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext():
            out = forward(xs)
        # a label-free loss: its own cost is negligible, the backward pass is the model's
        loss = out.float().square().mean()
        if loss.requires_grad:  # nothing trainable: a forward-only step
            loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    return step


def trial(
    model: nn.Module,
    cands: Sequence[Candidate],
    x: torch.Tensor,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    rounds: int | None = None,
    budget: float | None = None,
    total_steps: int = 0,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time each candidate: one warm-up step each (its compilation, for a compiled one), then
    `rounds` rounds of one step per candidate in turn, stopping once the budget is spent: the
    larger of `budget` seconds and `RUN_SHARE` of the run's `total_steps` at the first step's
    pace. Every global RNG is put back afterwards.

    Returns:
        (label -> timed step seconds, label -> warm-up seconds).

    Raises:
        TooLong: after the first candidate's warm-up and first timed step, when two steps per
            candidate would exceed the budget
            (a large model on a slow device in a short run: then nothing more is timed).
    """
    from .runtime import rng_state, set_rng_state

    budget = BUDGET_SECONDS if budget is None else budget
    rounds = ROUNDS if rounds is None else rounds
    saved = rng_state()
    try:
        steps = {c.label: _setup(model, c, x, make_optimizer) for c in cands}
        start = time.perf_counter()  # the budget counts the warm-up steps too
        (first, pace_step), n = next(iter(steps.items())), len(steps)
        warm = {first: pace_step()}
        times: dict[str, list[float]] = {label: [] for label in steps}
        times[first].append(pace_step())  # its first timed step sets the pace (the warm-up has one-off costs)
        budget = max(budget, RUN_SHARE * times[first][0] * total_steps)
        if 2 * n * times[first][0] > budget:
            raise TooLong(
                f"one step takes {times[first][0]:.1f} s: timing {n} candidates would take longer than the "
                f"trial's budget ({budget:.1f} s)"
            )
        warm.update({label: step() for label, step in steps.items() if label != first})
        for i in range(rounds):
            if i and time.perf_counter() - start > budget:
                break
            for label, step in steps.items():
                if i or label != first:
                    times[label].append(step())
        return times, warm
    finally:
        set_rng_state(saved)
        if x.device.type == "cuda":
            torch.cuda.empty_cache()


def pick(
    cands: Sequence[Candidate], times: Mapping[str, Sequence[float]], warm: Mapping[str, float], total_steps: int
) -> tuple[Candidate, float | None]:
    """The candidate whose fastest step is shortest; a compiled one pays its compilation (its
    warm-up step less an eager step) spread over the run's `total_steps`. Pure.

    Returns:
        (the choice, the compilation seconds measured, or None without a compiled candidate)."""

    def cost(c: Candidate) -> float:
        step = min(times[c.label])
        if not c.compile:
            return step * total_steps
        return step * total_steps + max(warm[c.label] - step, 0.0)

    compiled = [warm[c.label] - min(times[c.label]) for c in cands if c.compile]
    return min(cands, key=cost), (max(compiled) if compiled else None)


def tune(
    model: nn.Module,
    cands: Sequence[Candidate],
    x: torch.Tensor,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    surgery: Any,
    total_steps: int,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Tuning:
    """Decide among `cands`: nothing to time with one, else the cached decision, else a trial.

    Args:
        model: the run's model (not changed: the trial times copies on the batch's device),
            its parameters trainable as in the run's longest stage.
        x: a normalised input batch of the run's batch size, on the run's device.
        make_optimizer: the run's optimizer for a model copy.
        surgery: the spec's model and surgery sections (part of the model's fingerprint).
        total_steps: the run's optimizer steps (what a compilation is spread over).
        agree: under DDP, sums a tensor over the processes, so that every process makes the
            same choice from the summed fastest steps.
    """
    if len(cands) == 1:
        return Tuning(cands[0], "explicit")
    key = cache_key(model, surgery, x.shape, x.device, cands, total_steps)
    cached = _cached_times(_read_cache(key), cands)
    if cached is not None:
        times, warm, measured = cached
        tuning = Tuning(cands[0], "cache", measured, 0.0, key)
    else:
        start = time.perf_counter()
        try:
            times, warm = trial(model, cands, x, make_optimizer, total_steps=total_steps)
            source = "trial"
        except TooLong as exc:
            times = {c.label: [float(i)] for i, c in enumerate(cands)}
            warm = {c.label: 0.0 for c in cands}
            source = f"fallback: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failed trial (memory, an operator) must not fail the run
            times = {c.label: [float(i)] for i, c in enumerate(cands)}  # the first candidate, the provisional one
            warm = {c.label: 0.0 for c in cands}
            source = f"fallback: the trial failed ({type(exc).__name__}: {str(exc)[:200]})"
        measured = times if source == "trial" else {}  # a fallback's stand-in figures are not recorded
        tuning = Tuning(cands[0], source, measured, time.perf_counter() - start, key)
    if agree is not None:  # every process decides from the same (summed) figures
        fastest = agree(torch.tensor([min(times[c.label]) for c in cands], dtype=torch.float64))
        times = {c.label: [float(m)] for c, m in zip(cands, fastest.tolist())}
    tuning.chosen, tuning.compile_seconds = pick(cands, times, warm, total_steps)
    if tuning.source == "trial" or tuning.source.startswith("fallback: one step"):  # not a failed trial
        _write_cache(key, {**tuning.record(), "warm": warm})
    return tuning


__all__ = ["Candidate", "Tuning", "candidates", "cache_dir", "cache_key", "machine", "trial", "pick", "tune"]
