"""`surgery lr-find SPEC`: an exponential learning-rate sweep at one stage of a spec.

The model is built exactly as `surgery run` builds it (same weights, data, optimizer, seed), with
the groups that train at ``--stage EPOCH`` unfrozen and each group's lr as the schedule gives it
at that epoch. Every step then multiplies *all* those lrs by one factor, rising exponentially
from ``--start`` to ``--end``: the ratios between groups stay what the spec says, and the sweep
answers one question, how much to scale them together. (ignite's FastaiLRFinder sweeps every
param group but leaves open how their ratios relate; here they are fixed by construction.)

Loss: the mean training loss of each optimizer step. While sweeping, a bias-corrected
exponential moving average (``beta = 0.9``) stops the sweep once it exceeds 4x its best
(fastai's rule), or at once on a loss that is not finite. Afterwards the whole curve is smoothed
by a *centred* moving average over 5% of the sweep (at least 3 steps): a one-way average (what
fastai and torch-lr-finder plot) trails the loss by about ``1 / (1 - beta)`` steps, which on a
sweep of a hundred steps over seven decades shifts every feature right by most of a decade.

Suggestion: fastai's *valley* rule (its default since fastai 2.4): the longest stretch over
which the smoothed loss keeps falling, and the point halfway along it. It is steadier than the
steepest slope, which one noisy step can move by a decade; the steepest point is reported
beside it. Like fastai, the first tenth of the sweep and the last five steps (where it
diverges) are left out of both.

Nothing is trained for real: the model lives in memory and is dropped; nothing is written into
any run directory; the sweep is seeded (``seed``), so it repeats exactly on the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import Origin, UsageError
from ..runs import layout
from ..spec import Spec

BETA = 0.9  # smoothing of the recorded loss
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its best
MAX_STEPS = 2000


# --------------------------------------------------------------------------- pure parts
def multipliers(start: float, end: float, steps: int) -> list[float]:
    """`steps` factors from `start` to `end`, evenly spaced on a log scale (both ends included)."""
    if steps == 1:
        return [start]
    ratio = math.log(end / start) / (steps - 1)
    return [start * math.exp(ratio * i) for i in range(steps)]


def running(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average (what the sweep watches for divergence as it goes):
    the first values are not pulled towards 0."""
    out, average = [], 0.0
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def smooth(losses: Sequence[float], window: int | None = None, cap: float = math.inf) -> list[float]:
    """A centred moving average (no lag) over `window` steps: by default 5% of the sweep, at
    least 3, odd. The ends repeat their last value (``mode="nearest"``).

    Losses above `cap` count as `cap`: the sweep passes the divergence threshold, so a diverged
    loss of thousands does not spread back into the valley.
    """
    if len(losses) < 2:
        return [float(v) for v in losses]
    from scipy.ndimage import uniform_filter1d

    window = window or max(3, len(losses) // 20)
    window += 1 - window % 2
    return [float(v) for v in uniform_filter1d([min(v, cap) for v in losses], size=window, mode="nearest")]


def _window(n: int) -> tuple[int, int]:
    """The part of a sweep of `n` steps the rules read: the first tenth and the last five left out
    (fastai's ``[num_it // 10 : -5]``), shrunk for short sweeps so something is left."""
    first = n // 10
    last = n - 5 if n - 5 - first >= 3 else n
    return first, last


def valley(smoothed: Sequence[float], noise: float = 0.0) -> int | None:
    """fastai's valley rule: the index halfway along the longest falling stretch of the loss.

    The stretch is the longest decreasing subsequence ending anywhere (its length counted in
    steps); it starts that many steps before its end, and the suggestion lies a third plus a
    sixth of the way in. None when the loss never falls over three steps (or the window is
    shorter), or falls along the stretch by no more than ``3 x noise``: on a flat, noisy curve
    the longest decreasing subsequence is noise, and fastai would still name a point.
    """
    import numpy as np

    first, last = _window(len(smoothed))
    losses = np.asarray(smoothed[first:last], dtype=np.float64)
    n = len(losses)
    if n < 3:
        return None
    depth = np.ones(n, dtype=np.int64)  # longest decreasing run (not necessarily contiguous) ending at i
    end = 0
    for i in range(1, n):
        higher = losses[:i] > losses[i]
        if higher.any():
            depth[i] = depth[:i][higher].max() + 1
        if depth[i] > depth[end]:
            end = i
    if depth[end] < 3:
        return None
    begin = end - int(depth[end]) + 1  # fastai writes `end - depth`, one step before the stretch
    if losses[begin : end + 1].max() - losses[end] <= 3 * noise:
        return None
    sections = (end - begin) / 3
    return first + begin + int(sections) + int(sections / 2)


def noise(losses: Sequence[float], smoothed: Sequence[float]) -> float:
    """The step-to-step noise of the loss: the spread of what smoothing took away, over the part
    of the sweep the rules read, as a robust standard deviation (1.4826 x the median absolute
    deviation), so the first spikes of divergence do not count as noise."""
    import numpy as np

    first, last = _window(len(losses))
    if last - first < 2:
        return 0.0
    residual = np.asarray(losses[first:last]) - np.asarray(smoothed[first:last])
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def steepest(factors: Sequence[float], smoothed: Sequence[float]) -> int | None:
    """The index where the smoothed loss falls fastest against log(multiplier), on the way down to
    its lowest point (past it, a diverging loss swings, and its falls are no guide)."""
    import numpy as np

    first, last = _window(len(smoothed))
    if last - first >= 3:
        last = max(first + 3, first + int(np.argmin(np.asarray(smoothed[first:last]))) + 1)
    if last - first < 3:
        return None
    slope = np.gradient(np.asarray(smoothed[first:last]), np.log(np.asarray(factors[first:last])))
    return first + int(np.argmin(slope))


def _round(value: float) -> float:
    """Two significant digits: a suggestion is not more precise than that."""
    return float(f"{value:.2g}")


def set_lines(spec: Spec, factor: float, groups: Sequence[str]) -> list[str]:
    """The ``--set`` options that scale the lr of `groups` by `factor` in the spec.

    A plain lr becomes ``factor x lr``; an ``{epoch: lr}`` table has every entry scaled, so its
    shape is kept. A spec without groups scales ``train.optimizer.lr``. Numbers keep a decimal
    point (``3.0e-04``) so YAML reads them as numbers.

    Example:
        >>> set_lines(spec, 0.5, ["head"])
        ['groups.0.lr=5.0e-04']
    """
    if spec.default_groups:
        return [f"train.optimizer.lr={_number(spec.train.optimizer.lr * factor)}"]
    lines = []
    for g in spec.groups:
        if g.name not in groups:
            continue
        if len(g.lr) == 1:
            lines.append(f"groups.{g.index}.lr={_number(g.lr[0][1] * factor)}")
        else:
            table = ", ".join(f"{epoch}: {_number(lr * factor)}" for epoch, lr in g.lr)
            lines.append(f"groups.{g.index}.lr={{{table}}}")
    return lines


def _number(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+03d}"


# --------------------------------------------------------------------------- the sweep
@dataclass
class LrFind:
    """A finished sweep: what `surgery lr-find` prints, plots and writes as lr_find.json."""

    spec: str
    stage: int
    start: float
    end: float
    steps: int
    groups: dict[str, dict[str, Any]]  # name -> {"trainable": bool, "lr": lr at the stage (x1)}
    multipliers: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str | None = None  # why the sweep ended before its last step
    rule: str = "valley"
    suggestion: float | None = None  # the multiplier, two significant digits
    suggestion_step: int | None = None
    no_suggestion: str | None = None  # why there is none
    noise: float = 0.0  # standard deviation of the loss around its smoothed curve
    steepest: float | None = None
    steepest_step: int | None = None
    set: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "running_beta": BETA, "diverge_factor": DIVERGE}


def _batches(loader: Any, first_epoch: int) -> Iterator[tuple[Any, Any]]:
    """The training batches of epoch `first_epoch`, then the next epochs', for as long as asked."""
    epoch = first_epoch
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def _step(ctx: Any, batches: Iterator, accumulate: int, stage: int, step: int) -> float:
    """One optimizer step over `accumulate` batches (as `run` takes them); the mean loss."""
    from .loop import images_to_device, optimizer_step

    total = 0.0
    for k in range(accumulate):
        x, y = next(batches)
        x, y = images_to_device(ctx, x, y)
        if ctx.batch_augment is not None:  # erasing, mixup: seeded per batch as in `run`
            x, y = ctx.batch_augment(x, y, stage, step * accumulate + k)
        with ctx.runtime.autocast():
            loss = ctx.criterion(ctx.forward(x).float(), y)
        ctx.scaler.scale(loss / accumulate).backward()
        total += float(loss.detach())
    optimizer_step(ctx)  # as `run` steps: gradient clipping, the AMP scaler (and the EMA, thrown away)
    ctx.optimizer.zero_grad(set_to_none=True)
    return total / accumulate


def lr_find(
    spec: Spec,
    *,
    stage: int = 0,
    steps: int = 100,
    start: float = 1e-4,
    end: float = 1e3,
    device: str | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LrFind:
    """Sweep one factor over every trainable group's lr at epoch `stage`; suggest one.

    Args:
        spec: the spec, as `surgery run` would train it.
        stage: the epoch whose trainable groups and lrs are swept (groups waiting on an event
            rule count as frozen: the sweep cannot know when they fire).
        steps: optimizer steps (each over ``train.accumulate`` batches).
        start, end: the first and last multiplier.
        on_step: called after each step with (step, multiplier, loss).

    Returns:
        The sweep; `suggestion` is None (and `no_suggestion` says why) when the loss never fell
        clearly over three steps or more.

    Raises:
        UsageError: a stage outside the run, a stage at which no group trains, bad sweep bounds.
    """
    check_sweep(spec, stage, steps, start, end)
    from .context import prepare
    from .loop import apply_trainable, set_train_mode
    from .optim import set_lrs
    from .schedule import lrs_at, unfreeze_epochs

    began = time.perf_counter()
    starts = unfreeze_epochs(spec)
    ctx = prepare(spec, device=device)
    flags = apply_trainable(ctx.model, ctx.built.groups, stage, starts)
    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
    set_train_mode(ctx.model, ctx.built.groups, flags)
    base = lrs_at(spec, stage, 1.0, starts)
    result = LrFind(
        spec=spec.name,
        stage=stage,
        start=start,
        end=end,
        steps=steps,
        groups={g: {"trainable": flags[g], "lr": base[g]} for g in base},
    )
    result.notes = [
        f"group {g.name!r} waits on its rule ({g.unfreeze_rule}) at epoch {stage}: taken as frozen"
        for g in spec.groups
        if g.unfreeze_rule is not None and starts[g.name] is None
    ]
    batches = _batches(ctx.train_loader, stage)
    ctx.optimizer.zero_grad(set_to_none=True)
    best = math.inf
    for i, factor in enumerate(multipliers(start, end, steps)):
        set_lrs(ctx.optimizer, {g: lr * factor for g, lr in base.items()})
        loss = _step(ctx, batches, spec.train.accumulate, stage, i)
        if not math.isfinite(loss):
            result.stopped = f"the loss became {loss} at step {i + 1} (multiplier {factor:.3g})"
            break
        result.multipliers.append(factor)
        result.losses.append(loss)
        if on_step is not None:
            on_step(i, factor, loss)
        average = running(result.losses)[-1]
        best = min(best, average)
        if average > DIVERGE * best:
            result.stopped = (
                f"diverged at step {i + 1} (multiplier {factor:.3g}): smoothed loss "
                f"{average:.3g} > {DIVERGE:g} x its best {best:.3g}"
            )
            break
    result.smoothed = smooth(result.losses, cap=DIVERGE * best)
    _suggest(spec, result)
    result.seconds = time.perf_counter() - began
    return result


def _suggest(spec: Spec, result: LrFind) -> None:
    result.noise = noise(result.losses, result.smoothed)
    index = valley(result.smoothed, result.noise)
    if index is None:
        result.no_suggestion = (
            f"the smoothed loss never fell clearly (by more than 3x its step-to-step noise, "
            f"{result.noise:.2g}) over at least three steps"
        )
        return
    fast = steepest(result.multipliers, result.smoothed)
    if fast is not None:
        result.steepest, result.steepest_step = _round(result.multipliers[fast]), fast
    result.suggestion, result.suggestion_step = _round(result.multipliers[index]), index
    trainable = [g for g, info in result.groups.items() if info["trainable"]]
    result.set = set_lines(spec, result.suggestion, trainable)


def check_sweep(spec: Spec, stage: int, steps: int, start: float, end: float) -> None:
    """The flags of `surgery lr-find`, before anything is built."""
    from .distributed import world_from_env
    from .schedule import trainable_groups, unfreeze_epochs

    world = world_from_env()[2]
    if world > 1:  # every process would sweep and write the same files
        raise UsageError(
            "lr-find runs in one process",
            origin=Origin.env("WORLD_SIZE", world),
            found=f"{world} processes",
            expected="surgery lr-find without torchrun",
            hint=f"to sweep at the global batch of {world} processes, add --set "
            f"train.batch_size={world * spec.train.batch_size}",
        )

    epochs = spec.train.epochs
    if not 0 <= stage < epochs:
        raise UsageError(
            f"--stage {stage} is outside this run of {epochs} epochs",
            origin=Origin.flag("--stage", stage),
            found=str(stage),
            expected=f"an epoch from 0 to {epochs - 1}",
        )
    if not trainable_groups(spec, stage, unfreeze_epochs(spec)):
        firsts = sorted(e for e in unfreeze_epochs(spec).values() if e is not None and e < epochs)
        raise UsageError(
            f"no group trains at epoch {stage}: there is nothing to sweep",
            origin=Origin.flag("--stage", stage),
            found=str(stage),
            expected="an epoch at which a group trains" + (f", e.g. {firsts[0]}" if firsts else ""),
            hint="`surgery inspect SPEC --schedule` shows which groups train when",
        )
    if not 5 <= steps <= MAX_STEPS:
        raise UsageError(
            f"--steps {steps} is outside 5..{MAX_STEPS}",
            origin=Origin.flag("--steps", steps),
            found=str(steps),
            expected="a few dozen to a few hundred steps (default 100)",
        )
    for flag, value in (("--start", start), ("--end", end)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(
                f"{flag} must be a positive multiplier",
                origin=Origin.flag(flag, value),
                found=str(value),
                expected="a factor of the spec's lrs, e.g. 1e-4 or 1e3",
            )
    if end <= start:
        raise UsageError(
            "the sweep must rise: --end is not above --start",
            origin=Origin.flag("--end", end),
            found=f"--start {start:g} --end {end:g}",
            expected="--end above --start, e.g. 1e-4 to 1e3",
        )


# --------------------------------------------------------------------------- output
def plot(result: LrFind) -> bytes:
    """Loss against the multiplier (log scale), the suggestion and the steepest point marked; PNG bytes."""
    from ..pages.plots import figure, figure_png

    fig = figure(7.5, 4.5)
    ax = fig.subplots()
    ax.plot(result.multipliers, result.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss per step")
    ax.plot(result.multipliers, result.smoothed, color="tab:blue", linewidth=2, label="smoothed (centred mean)")
    for step, value, colour, label in (
        (result.steepest_step, result.steepest, "tab:orange", "steepest"),
        (result.suggestion_step, result.suggestion, "tab:red", "suggestion (valley)"),
    ):
        if step is not None:
            ax.plot(
                [result.multipliers[step]],
                [result.smoothed[step]],
                "o",
                color=colour,
                markersize=8,
                label=f"{label}: x{value:g}",
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"lr multiplier (x each trainable group's lr at epoch {result.stage})")
    ax.set_ylabel("training loss")
    trained = ", ".join(f"{g} {info['lr']:.2g}" for g, info in result.groups.items() if info["trainable"])
    ax.set_title(f"lr-find {result.spec}, epoch {result.stage}: {trained}", fontsize=10)
    if result.smoothed:  # the divergence can dwarf the valley: show the sweep up to its lowest point
        bottom = min(range(len(result.smoothed)), key=result.smoothed.__getitem__)
        low = min(min(result.losses), min(result.smoothed))
        high = max(max(result.losses[: bottom + 1]), max(result.smoothed[: bottom + 1]))
        ax.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def default_out(spec: Spec) -> Path:
    """``runs/<name>-lr-find``: beside the run directory ``surgery run`` would write, never in it."""
    return Path("runs") / f"{spec.name}-lr-find"


def check_out(out: Path) -> None:
    """Refuse a folder that holds a run: a sweep never writes into a run directory."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", origin=Origin.flag("--out", out), expected="a folder")
    marks = [name for name in (layout.SPEC, layout.SUMMARY, "checkpoints") if (out / name).exists()]
    if marks:
        raise UsageError(
            f"--out {out} holds a run ({', '.join(marks)}): lr-find writes nothing into a run directory",
            origin=Origin.flag("--out", out),
            expected="a folder of its own",
            hint=f"leave --out out to write {out.name}-lr-find beside it, or name another folder",
        )


def write(result: LrFind, out: Path) -> tuple[Path, Path]:
    """lr_find.png, then lr_find.json, each atomically (the JSON, written last, names the plot)."""
    from ..files import atomic_write_bytes, write_json

    out.mkdir(parents=True, exist_ok=True)
    png, record = out / "lr_find.png", out / "lr_find.json"
    atomic_write_bytes(png, plot(result))
    write_json(record, {**result.to_dict(), "plot": png.name})
    return png, record


def lr_find_command(
    spec_path: str,
    overrides: Sequence[str] = (),
    *,
    stage: int = 0,
    steps: int = 100,
    start: float = 1e-4,
    end: float = 1e3,
    out: str | None = None,
    device: str | None = None,
    console: Any = None,
) -> int:
    """`surgery lr-find`: sweep, print the suggestion and its --set lines, write the plot and JSON."""
    from rich.markup import escape

    from ..spec import load_spec
    from ..untrusted import Console

    console = console or Console(highlight=False)
    spec = load_spec(spec_path, overrides)
    check_sweep(spec, stage, steps, start, end)
    folder = Path(out) if out else default_out(spec)
    check_out(folder)
    result = lr_find(spec, stage=stage, steps=steps, start=start, end=end, device=device)
    png, record = write(result, folder)
    say = lambda text: console.print(escape(text), soft_wrap=True)  # noqa: E731
    trained = ", ".join(f"{g} (lr {info['lr']:.3g})" for g, info in result.groups.items() if info["trainable"])
    frozen = [g for g, info in result.groups.items() if not info["trainable"]]
    say(
        f"lr-find {spec.name} at epoch {stage}: {trained} scaled together"
        + (f"; frozen: {', '.join(frozen)}" if frozen else "")
    )
    for note in result.notes:
        say(f"note: {note}")
    done = len(result.losses)
    say(
        f"{done} of {steps} steps, multiplier x{start:g} to x{result.multipliers[-1] if done else start:.3g}"
        + (f"; {result.stopped}" if result.stopped else "")
        + f" ({result.seconds:.1f}s)"
    )
    if result.suggestion is None:
        say(
            f"no suggestion: {result.no_suggestion}; look at the plot, or sweep another --stage, --start/--end "
            "or more --steps"
        )
    else:
        say(
            f"suggested multiplier: x{result.suggestion:g} (valley rule: halfway along the longest fall of the "
            f"smoothed loss); steepest fall at x{result.steepest:g}"
        )
        say("apply it with:")
        for line in result.set:
            say("  --set " + (f"'{line}'" if " " in line else line))
        if frozen:
            say(f"groups frozen at epoch {stage} ({', '.join(frozen)}) were not swept and keep their lr")
    say(f"wrote {png} and {record.name}")
    return 0


__all__ = [
    "lr_find",
    "lr_find_command",
    "LrFind",
    "multipliers",
    "running",
    "smooth",
    "valley",
    "noise",
    "steepest",
    "set_lines",
    "check_sweep",
    "default_out",
    "plot",
    "write",
]
