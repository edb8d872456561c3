"""One epoch of training, one pass of evaluation, and which parameters train.

`train_epoch` and `evaluate` take the run's `Context` (see `context.py`) and return an
`EpochResult`; they hold no state between calls except what `EpochState` carries, which is
exactly what a mid-epoch checkpoint keeps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import normalize
from ..model.groups import ResolvedGroup
from ..model.modes import evaluating
from .distributed import DataParallel, sync_buffers, trained_norms
from .mixing import hard_labels
from .optim import set_lrs
from .schedule import lrs_at, trainable_at

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context

StepHook = Callable[[int, int, float], None]
Batches = Iterator[tuple[int, torch.Tensor, torch.Tensor]]


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss, interrupt, diverged ranks), keeping a good checkpoint."""


class NonFiniteLoss(TrainingStopped):
    """A NaN or infinite loss with ``train.nonfinite: stop``."""


# --------------------------------------------------------------------------- freezing
def apply_trainable(
    model: nn.Module, groups: Sequence[ResolvedGroup], epoch: int, starts: Mapping[str, int | None] | None = None
) -> dict[str, bool]:
    """Set requires_grad for every parameter from its group's unfreeze epoch; return group -> trainable.

    `starts`: the epoch each group actually unfroze (``ctx.unfreeze.starts``), for event rules."""
    params = dict(model.named_parameters())
    starts = starts or {}
    flags = {}
    for g in groups:
        on = trainable_at(g.spec, epoch, starts.get(g.name))
        flags[g.name] = on
        for name in g.params:
            params[name].requires_grad_(on)
    return flags


def set_train_mode(model: nn.Module, groups: Sequence[ResolvedGroup], flags: Mapping[str, bool]) -> None:
    """Train mode, except normalization layers of frozen groups: their running statistics stay as loaded."""
    model.train()
    modules = dict(model.named_modules())
    for g in groups:
        if not flags[g.name] and g.spec.norm == "frozen":
            for path in g.norm_modules:
                modules[path].eval()


# --------------------------------------------------------------------------- results
@dataclass
class EpochResult:
    loss: float
    acc: float
    seen: int
    seconds: float
    data_seconds: float = 0.0
    skipped: int = 0
    top5: float | None = None
    confusion: torch.Tensor | None = None
    per_class: list[float] = field(default_factory=list)  # recall per class; multi-label: F1 per class
    mean_ap: float | None = None  # multi-label only (then `acc` is the exact-match ratio)
    stopped: bool = False  # an interrupt ended the epoch early; `EpochState` says where
    terms: dict[str, float] = field(default_factory=dict)  # train.regularize: each term's mean per image


@dataclass
class EpochState:
    """This process's progress through one training epoch: what a mid-epoch checkpoint keeps.

    Sums are this process's own (`train_epoch` adds them over processes for the result) and
    exact: the loss sum is float64, accumulated in the same order a resumed run continues it.
    """

    batch: int = 0  # batches done; a resumed epoch starts at this one
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)  # train.regularize: each term's sum over images


# --------------------------------------------------------------------------- batches
def _image_batches(loader, epoch: int, limit: int | None, start: int = 0) -> Batches:
    if limit is not None and start >= limit:
        return
    for step, (x, y) in enumerate(loader.epoch(epoch, start), start=start):
        if limit is not None and step >= limit:
            break
        yield step, x, y


def cached_train_batches(ctx: Context, epoch: int, start: int) -> Batches:
    """The epoch's batches in the loader's own order, as cached head inputs instead of images."""
    cache, limit = ctx.features, ctx.spec.train.limit_batches
    for step, indices in enumerate(ctx.train_loader.batch_indices(epoch, start), start=start):
        if limit is not None and step >= limit:
            break
        index = torch.tensor(indices)
        yield step, cache.train[index], cache.train_labels[index]


def _cached_val_batches(ctx: Context) -> Batches:
    cache, batch, limit = ctx.features, ctx.val_loader.batch_size, ctx.spec.train.limit_batches
    n = len(cache.val) if limit is None else min(len(cache.val), limit * batch)
    return ((i, cache.val[i : i + batch], cache.val_labels[i : i + batch]) for i in range(0, n, batch))


def images_to_device(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rt = ctx.runtime
    x = x.to(rt.device, non_blocking=rt.pin_memory)
    y = y.to(rt.device, non_blocking=rt.pin_memory)
    # uint8 crosses to the device (4x fewer bytes); normalisation runs there
    x = normalize(x, ctx.data.mean, ctx.data.std).contiguous(memory_format=rt.memory_format)
    return x, y


def _features_to_device(ctx: Context, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return f.to(ctx.runtime.device, non_blocking=ctx.runtime.pin_memory), y.to(ctx.runtime.device)


def _train_inputs(ctx: Context, epoch: int, start: int) -> tuple[Batches, Callable, Callable]:
    """(batches, forward, to_device) for a training epoch: cached head inputs in head-only stages."""
    if ctx.features is not None:
        return (
            cached_train_batches(ctx, epoch, start),
            ctx.model.get_submodule(ctx.features.head),
            _features_to_device,
        )
    return _image_batches(ctx.train_loader, epoch, ctx.spec.train.limit_batches, start), ctx.forward, images_to_device


# --------------------------------------------------------------------------- one epoch
def _verdict(ctx: Context, loss: torch.Tensor, stop: Callable[[], bool]) -> tuple[bool, bool]:
    """(non-finite loss, stop requested), agreed by every process before the backward pass:
    every process must take the same branch, or DDP's all-reduces would wait forever."""
    env = ctx.dist
    if not env.enabled:
        return not bool(torch.isfinite(loss)), False  # a single process asks `stop` after the step
    flags = torch.stack(
        [
            (~torch.isfinite(loss.detach())).double(),
            torch.tensor(float(stop()), device=ctx.runtime.device, dtype=torch.float64),
        ]
    )
    verdict = env.max_(flags)
    return bool(verdict[0]), bool(verdict[1])


def _backward(ctx: Context, loss: torch.Tensor, window: int) -> None:
    # each batch's mean loss weighs 1/window: the window's gradient is the mean over its images
    ctx.scaler.scale(loss / window if window > 1 else loss).backward()


def optimizer_step(ctx: Context) -> None:
    """One optimizer step on the accumulated gradients: clipped (train.grad_clip) after the AMP
    scaler's unscale, the scaler updated, the EMA of the weights updated (`lr-find` steps so too)."""
    clip = ctx.spec.train.grad_clip
    if clip:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.trainable_params, clip)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    if ctx.ema is not None:
        ctx.ema.update(ctx.model)


def _call(forward: Callable, x: torch.Tensor, sync: bool) -> torch.Tensor:
    if isinstance(forward, DataParallel):
        return forward(x, sync=sync)
    return forward(x)


def accumulation_window(step: int, steps: int, accumulate: int) -> tuple[int, int]:
    """(first batch, size) of the accumulation window that holds batch `step` of an epoch of `steps`.

    Windows start at batch 0 of every epoch; the last one of an epoch may be shorter (it is not
    carried into the next epoch, so an epoch stays a unit of the schedule, of resume and of DDP).
    """
    first = step - step % accumulate
    return first, min(accumulate, steps - first)


def train_epoch(
    ctx: Context,
    epoch: int,
    flags: Mapping[str, bool],
    *,
    on_step: StepHook | None = None,
    stop: Callable[[], bool] = lambda: False,
    state: EpochState | None = None,
) -> EpochResult:
    """Train one epoch (from batch ``state.batch`` when resuming); return its figures over all processes.

    `stop` is asked after every batch; when it says so, the epoch ends after the optimizer step
    that closes the current accumulation window (``train.accumulate``; every batch when it is 1)
    with ``result.stopped``, and `state` holds what a checkpoint needs to continue it exactly
    (no half-accumulated gradient is ever lost). Under DDP the processes agree on it (and on a
    non-finite loss) before each backward pass, so all stop after the same batch, whichever of
    them got the signal.

    With ``train.accumulate: N`` the gradients of N batches add up (each loss scaled by 1/N)
    before one optimizer step; a per-step lr schedule moves at each optimizer step, to the
    fraction of the epoch where its window starts; under DDP the first N-1 backward passes of
    a window skip the all-reduce.

    Raises:
        NonFiniteLoss: a NaN or infinite loss on any process, with ``train.nonfinite: stop``.
    """
    # --- the epoch's setup: train mode, learning rates, running sums (from `state` when resuming)
    train = ctx.spec.train
    state = state if state is not None else EpochState()
    set_train_mode(ctx.model, ctx.built.groups, flags)
    trains = any(flags.values())
    steps, accumulate = ctx.steps, train.accumulate
    set_lrs(ctx.optimizer, lrs_at(ctx.spec, epoch, ctx.plateau.current, ctx.unfreeze.starts))
    ctx.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.tensor(state.loss_sum, device=ctx.runtime.device, dtype=torch.float64)
    correct = torch.tensor(state.correct, device=ctx.runtime.device, dtype=torch.int64)
    batches, forward, to_device = _train_inputs(ctx, epoch, state.batch)
    step, stopped, data_seconds = state.batch - 1, False, 0.0
    good = 0  # batches of the current window that reached backward
    start = fetched = time.perf_counter()
    # --- the batches: forward, the processes' verdict, backward; a step at the end of each window
    for step, x, y in batches:
        data_seconds += time.perf_counter() - fetched
        first, window = accumulation_window(step, steps, accumulate)
        last = step == first + window - 1
        if train.scheduler.per_step and step and step == first:
            set_lrs(ctx.optimizer, lrs_at(ctx.spec, epoch + step / steps, ctx.plateau.current, ctx.unfreeze.starts))
        logits, loss, y, terms = _forward_loss(ctx, forward, to_device, x, y, epoch, step, sync=last, grad=trains)
        nonfinite, asked = _verdict(ctx, loss, stop)
        stopped = stopped or asked
        if nonfinite and train.nonfinite == "stop":
            raise _nonfinite_loss(loss, epoch, step, steps)
        if nonfinite:  # train.nonfinite: skip; the window's other batches keep their weight 1/window
            state.skipped += 1
        else:
            if trains:
                _backward(ctx, loss, window)
                good += 1
            loss_sum += loss.detach().double() * y.shape[0]
            _add_terms(state, terms, y.shape[0])
            correct += _correct(ctx, logits.detach(), y)
            state.seen += y.shape[0]
            if on_step is not None:
                on_step(epoch, step, float(loss.detach()))
            stopped = stopped or (not ctx.dist.enabled and stop())
        if last:
            _close_window(ctx, good, nonfinite)
            good = 0
            if stopped:
                break
        fetched = time.perf_counter()
    # --- what a checkpoint keeps, and the epoch's figures over all processes
    state.batch = step + 1
    state.loss_sum, state.correct = float(loss_sum), int(correct)
    state.seconds += time.perf_counter() - start
    state.data_seconds += data_seconds
    # a stop after the epoch's last batch ends the epoch normally (validated, saved, then stopped)
    return _epoch_result(ctx, state, stopped=stopped and state.batch < steps)


def _forward_loss(
    ctx: Context,
    forward: Callable,
    to_device: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    step: int,
    *,
    sync: bool,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One batch moved to the device, augmented, and through the model: (logits, loss, targets,
    the regularisers' terms). The loss is the objective: the task's loss plus every term."""
    x, y = to_device(ctx, x, y)
    if ctx.batch_augment is not None and ctx.features is None:
        x, y = ctx.batch_augment(x, y, epoch, step)  # y: soft targets with mixup
    reg, terms = ctx.regularizer, {}
    with ctx.runtime.autocast(), torch.set_grad_enabled(grad):
        with reg.capture() if reg is not None and grad else contextlib.nullcontext({}) as kept:
            logits = _call(forward, x, sync=sync)
        loss = ctx.criterion(logits.float(), y)
        if reg is not None and grad:
            terms = reg.terms(x, kept, ctx.runtime.autocast)
            loss = loss + sum(terms.values())
    return logits, loss, y, terms


def _add_terms(state: EpochState, terms: Mapping[str, torch.Tensor], n: int) -> None:
    for name, value in terms.items():  # train.regularize: summed over images, like the loss
        state.terms[name] = state.terms.get(name, 0.0) + float(value.detach()) * n


def _nonfinite_loss(loss: torch.Tensor, epoch: int, step: int, steps: int) -> NonFiniteLoss:
    """The error for a non-finite loss: its value, or that another process had it."""
    where = f"epoch {epoch + 1}, batch {step + 1} of {steps}"
    value = loss.item()
    return NonFiniteLoss(
        f"the loss became {value} in {where}"
        if not math.isfinite(value)
        else f"the loss became non-finite on another process in {where}"
    )


def _close_window(ctx: Context, good: int, nonfinite: bool) -> None:
    """The end of an accumulation window: an optimizer step when `good` batches reached backward, gradients cleared."""
    # under DDP only the window's last backward all-reduces: when it was skipped, the
    # window's gradients are this process's own, and stepping on them would split the ranks
    if good and not (nonfinite and ctx.dist.enabled):
        optimizer_step(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)


def _correct(ctx: Context, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Images counted right: top-1 (the dominant label with mixup); multi-label: every class
    on the right side of ``data.threshold`` (exact match)."""
    if ctx.spec.data.multi_label:
        return ((torch.sigmoid(logits.float()) >= ctx.spec.data.threshold) == (y > 0.5)).all(1).sum()
    return (logits.argmax(1) == hard_labels(y)).sum()


def _epoch_result(ctx: Context, state: EpochState, *, stopped: bool) -> EpochResult:
    """The epoch's figures summed over processes; BatchNorm statistics averaged when it ended."""
    env = ctx.dist
    if not stopped:
        # BatchNorm statistics moved per process; frozen norms (eval mode) are not touched
        sync_buffers([ctx.model] + ([ctx.ema.module] if ctx.ema is not None else []), trained_norms(ctx.model), env)
    names = sorted(state.terms)
    totals = env.sum_(
        torch.tensor(
            [state.loss_sum, state.correct, state.seen, state.skipped, *(state.terms[k] for k in names)],
            dtype=torch.float64,
            device=env.device if env.enabled else "cpu",
        )
    ).tolist()
    loss_total, correct_total, seen_total, skipped_total = totals[:4]
    return EpochResult(
        loss=loss_total / max(seen_total, 1),
        acc=correct_total / max(seen_total, 1),
        seen=int(seen_total),
        seconds=state.seconds,
        data_seconds=state.data_seconds,
        skipped=int(skipped_total),
        stopped=stopped,
        terms={k: v / max(seen_total, 1) for k, v in zip(names, totals[4:])},
    )


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(ctx: Context, model_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EpochResult:
    """Validation loss, top-1, top-5 (more than 5 classes) and the confusion matrix.

    Under DDP each process scores its share and the figures are summed; the items the sampler
    repeats to even out the shares are left out, so every image counts exactly once.
    """
    if ctx.spec.data.multi_label:
        return _evaluate_multi_label(ctx, model_fn)
    device, k = ctx.runtime.device, len(ctx.data.classes)
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    for logits, y in _val_logits(ctx, model_fn):
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
        if k > 5:
            top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
    env = ctx.dist
    confusion = env.sum_(confusion.to(env.device)).cpu().reshape(k, k)
    loss_total, top5_total = env.sum_(torch.stack([loss_sum, top5.double()]).to(env.device)).tolist()
    seen = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return EpochResult(
        loss=loss_total / max(seen, 1),
        acc=int(confusion.diag().sum()) / max(seen, 1),
        seen=seen,
        seconds=time.perf_counter() - start,
        top5=top5_total / max(seen, 1) if k > 5 else None,
        confusion=confusion,
        per_class=per_class,
    )


def _val_logits(ctx: Context, model_fn: Callable | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float logits, targets) of every validation batch, the model in eval mode (each module's
    own mode restored after), the items the distributed sampler repeats left out."""
    if ctx.features is not None and model_fn is None:
        batches, forward, to_device = (
            _cached_val_batches(ctx),
            ctx.model.get_submodule(ctx.features.head),
            _features_to_device,
        )
    else:
        batches = _image_batches(ctx.val_loader, 0, ctx.spec.train.limit_batches)
        forward, to_device = model_fn or ctx.forward, images_to_device
    unique, position = ctx.val_loader.unique_items, 0
    with evaluating(ctx.model):
        for _, x, y in batches:
            x, y = to_device(ctx, x, y)
            with ctx.runtime.autocast():
                logits = forward(x).float()
            if position + len(y) > unique:  # repeats added by the distributed sampler
                keep = unique - position
                logits, y = logits[:keep], y[:keep]
            position += len(y)
            yield logits, y


@torch.no_grad()
def _evaluate_multi_label(ctx: Context, model_fn: Callable | None) -> EpochResult:
    """`evaluate` for multi-hot targets: BCE loss, and scikit-learn's figures on every image's
    sigmoid probabilities, gathered from all processes (``acc``: exact-match ratio)."""
    from .multilabel import multi_label_metrics

    probs, targets, loss_sum = [], [], 0.0
    start = time.perf_counter()
    for logits, y in _val_logits(ctx, model_fn):
        y = y.float()
        loss_sum += float(F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).double().sum())
        probs.append(torch.sigmoid(logits).cpu())
        targets.append(y.cpu())
    k = len(ctx.data.classes)
    parts = ctx.dist.gather(
        (
            torch.cat(probs) if probs else torch.zeros(0, k),
            torch.cat(targets) if targets else torch.zeros(0, k),
            loss_sum,
        )
    )
    p = torch.cat([part[0] for part in parts]).numpy()
    t = torch.cat([part[1] for part in parts]).numpy()
    seen = len(p)
    m = multi_label_metrics(p, t, ctx.spec.data.threshold)
    return EpochResult(
        loss=sum(part[2] for part in parts) / max(seen, 1),
        acc=m.exact_match,
        seen=seen,
        seconds=time.perf_counter() - start,
        per_class=m.f1,
        mean_ap=m.mean_ap,
    )
