"""`surgery run`: fine-tune a surgered model with per-group learning rates and unfreeze epochs.

The loop reads top to bottom. Per-epoch decisions (which groups train, each group's lr) come
from the pure functions of `schedule.py`; the only state carried between epochs is what the
checkpoint holds, so a resumed run continues exactly where it stopped:

    checkpoints/last.pt = {
      epoch, batch        where to continue: batch > 0 means mid-epoch (after Ctrl-C)
      model, optimizer, scaler, plateau, ema, loaders (their generators)
      ranks: [per process: rng (python, numpy, torch, cuda), partial-epoch sums, and under DDP
              the BatchNorm statistics, which move per process until the epoch ends]
      best, rows          the best epoch so far and every metrics row (metrics.jsonl is rewritten
                          from them, so a resumed run lists each epoch exactly once)
      world_size, spec    what the run was started with
    }

Under torchrun the same loop runs in every process (see `surgery.distributed`): batches are
sharded, metrics are summed over processes, only rank 0 writes and prints, and the ranks'
parameters are compared bit for bit after every epoch. ``train.batch_size`` is per process.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .builder import Built, build
from .cache import FeatureCache
from .data import DataBundle, build_data, make_loader, normalize
from .distributed import DataParallel, Distributed
from .errors import SpecError, format_path
from .groups import ResolvedGroup
from .optim import build_optimizer, set_lrs
from .rundir import (RunDirError, check_writable, plot_confusion, plot_curves, read_metrics, remove_temporaries,
                     save_safetensors, save_torch, write_json, write_metrics, write_text)
from .runtime import Compiled, Runtime, make_runtime, rng_state, seed_everything, set_rng_state
from .schedule import Plateau, lrs_at, unfreeze_events
from .spec import Spec, load_spec

log = logging.getLogger(__name__)

StepHook = Callable[[int, int, float], None]

CHECKPOINT_FORMAT = 2


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss, interrupt, diverged ranks), keeping a good checkpoint."""


class NonFiniteLoss(TrainingStopped):
    """A NaN or infinite loss with ``train.nonfinite: stop``."""


# --------------------------------------------------------------------------- freezing
def apply_trainable(model: nn.Module, groups: Sequence[ResolvedGroup], epoch: int) -> dict[str, bool]:
    """Set requires_grad for every parameter from its group's unfreeze epoch; return group -> trainable."""
    params = dict(model.named_parameters())
    flags = {}
    for g in groups:
        on = g.spec.trainable(epoch)
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


# --------------------------------------------------------------------------- one epoch
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
    per_class: list[float] = field(default_factory=list)
    stopped: bool = False  # an interrupt ended the epoch early; `EpochState` says where


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


@dataclass
class Context:
    """Everything the epoch functions share, built once by `prepare`."""

    spec: Spec
    built: Built
    data: DataBundle
    runtime: Runtime
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plateau: Plateau
    ema: Any
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    trainable_params: list[nn.Parameter] = field(default_factory=list)
    dist: Distributed = field(default_factory=Distributed)
    features: FeatureCache | None = None  # head-only stages: the frozen body's outputs, computed once

    @property
    def steps(self) -> int:
        """Training batches per epoch on each process (``train.limit_batches`` applied)."""
        limit = self.spec.train["limit_batches"]
        return min(len(self.train_loader), limit) if limit else len(self.train_loader)


def _batches(loader: Any, epoch: int, limit: int | None,
             start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    if limit is not None and start >= limit:
        return
    for step, (x, y) in enumerate(loader.epoch(epoch, start), start=start):
        if limit is not None and step >= limit:
            break
        yield step, x, y


def _to_device(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rt = ctx.runtime
    x = x.to(rt.device, non_blocking=rt.pin_memory)
    y = y.to(rt.device, non_blocking=rt.pin_memory)
    # uint8 crosses to the device (4x fewer bytes); normalisation runs there
    x = normalize(x, ctx.data.mean, ctx.data.std).contiguous(memory_format=rt.memory_format)
    return x, y


def _cached_batches(ctx: Context, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The epoch's batches in the loader's own order, as cached head inputs instead of images."""
    cache = ctx.features
    limit = ctx.spec.train["limit_batches"]
    for step, indices in enumerate(ctx.train_loader.batch_indices(epoch, start), start=start):
        if limit is not None and step >= limit:
            break
        index = torch.tensor(indices)
        yield step, cache.train[index], cache.train_labels[index]


def _head_forward(ctx: Context) -> Callable[[torch.Tensor], torch.Tensor]:
    return ctx.model.get_submodule(ctx.features.head)


def _feature_to_device(ctx: Context, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return f.to(ctx.runtime.device, non_blocking=ctx.runtime.pin_memory), y.to(ctx.runtime.device)


def train_epoch(ctx: Context, epoch: int, flags: Mapping[str, bool], *, on_step: StepHook | None = None,
                stop: Callable[[], bool] = lambda: False, state: EpochState | None = None) -> EpochResult:
    """Train one epoch (from batch ``state.batch`` when resuming); return its figures over all processes.

    `stop` is asked after every batch; when it says so, the epoch ends there with
    ``result.stopped`` and `state` holds what a checkpoint needs to continue it exactly. Under
    DDP the processes agree on it (and on a non-finite loss) before each backward pass, so all
    stop after the same batch, whichever of them got the signal.

    Raises:
        NonFiniteLoss: a NaN or infinite loss on any process, with ``train.nonfinite: stop``.
    """
    spec, train, env = ctx.spec, ctx.spec.train, ctx.dist
    state = state if state is not None else EpochState()
    set_train_mode(ctx.model, ctx.built.groups, flags)
    any_trainable = any(flags.values())
    steps = ctx.steps
    per_step = train["scheduler"]["per_step"]
    set_lrs(ctx.optimizer, lrs_at(spec, epoch, ctx.plateau.current))
    device = ctx.runtime.device
    loss_sum = torch.tensor(state.loss_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(state.correct, device=device, dtype=torch.int64)
    seen, skipped = state.seen, state.skipped
    data_seconds = 0.0
    stopped = False
    start = time.perf_counter()
    fetched = start
    step = state.batch - 1
    if ctx.features is not None:  # head-only stage on cached features: same order, same inputs to the head
        batches, forward, to_device = _cached_batches(ctx, epoch, state.batch), _head_forward(ctx), _feature_to_device
    else:
        batches = _batches(ctx.train_loader, epoch, train["limit_batches"], state.batch)
        forward, to_device = ctx.forward, _to_device
    for step, x, y in batches:
        data_seconds += time.perf_counter() - fetched
        if per_step and step:
            set_lrs(ctx.optimizer, lrs_at(spec, epoch + step / steps, ctx.plateau.current))
        x, y = to_device(ctx, x, y)
        with ctx.runtime.autocast(), torch.set_grad_enabled(any_trainable):
            logits = forward(x)
            loss = ctx.criterion(logits.float(), y)
        if env.enabled:
            # every process must take the same branch, or DDP's all-reduces would wait forever
            verdict = env.max_(torch.stack([(~torch.isfinite(loss.detach())).double(),
                                            torch.tensor(float(stop()), device=device, dtype=torch.float64)]))
            nonfinite, stopped = bool(verdict[0]), bool(verdict[1])
        else:
            nonfinite = not bool(torch.isfinite(loss))
        if nonfinite:
            if train["nonfinite"] == "skip":
                skipped += 1
                ctx.optimizer.zero_grad(set_to_none=True)
                fetched = time.perf_counter()
                if stopped:
                    break
                continue
            value = loss.item()
            where = f"epoch {epoch + 1}, batch {step + 1} of {steps}"
            raise NonFiniteLoss(f"the loss became {value} in {where}" if not math.isfinite(value)
                                else f"the loss became non-finite on another process in {where}")
        if any_trainable:
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.scaler.scale(loss).backward()
            if train["grad_clip"]:
                ctx.scaler.unscale_(ctx.optimizer)
                torch.nn.utils.clip_grad_norm_(ctx.trainable_params, train["grad_clip"])
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
            if ctx.ema is not None:
                ctx.ema.update(ctx.model)
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
        if on_step is not None:
            on_step(epoch, step, float(loss.detach()))
        if not env.enabled:
            stopped = stop()
        if stopped:
            break
        fetched = time.perf_counter()
    seconds = time.perf_counter() - start
    state.batch = step + 1
    state.loss_sum, state.correct, state.seen, state.skipped = float(loss_sum), int(correct), seen, skipped
    state.seconds += seconds
    state.data_seconds += data_seconds
    # a stop after the epoch's last batch ends the epoch normally (validated, saved, then stopped)
    stopped = stopped and state.batch < steps
    if not stopped:
        # BatchNorm statistics moved per process; frozen norms (eval mode) are not touched
        distributed.sync_buffers([ctx.model] + ([ctx.ema.module] if ctx.ema is not None else []),
                                 distributed.trained_norms(ctx.model), env)
    totals = env.sum_(torch.tensor([state.loss_sum, state.correct, state.seen, state.skipped],
                                   dtype=torch.float64, device=env.device if env.enabled else "cpu")).tolist()
    loss_total, correct_total, seen_total, skipped_total = totals
    return EpochResult(loss=loss_total / max(seen_total, 1), acc=correct_total / max(seen_total, 1),
                       seen=int(seen_total), seconds=state.seconds, data_seconds=state.data_seconds,
                       skipped=int(skipped_total), stopped=stopped)


@torch.no_grad()
def evaluate(ctx: Context, model_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EpochResult:
    """Validation loss, top-1, top-5 (more than 5 classes) and the confusion matrix.

    Under DDP each process scores its share and the figures are summed; the items the sampler
    repeats to even out the shares are left out, so every image counts exactly once.
    """
    was_training = ctx.model.training
    ctx.model.eval()
    forward = model_fn or ctx.forward
    device = ctx.runtime.device
    k = len(ctx.data.classes)
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    unique = ctx.val_loader.unique_items
    position = 0
    start = time.perf_counter()
    if ctx.features is not None and model_fn is None:
        cache, batch = ctx.features, ctx.val_loader.batch_size
        limit = ctx.spec.train["limit_batches"]
        n = len(cache.val) if limit is None else min(len(cache.val), limit * batch)
        batches = ((i, cache.val[i: i + batch], cache.val_labels[i: i + batch]) for i in range(0, n, batch))
        forward, to_device = _head_forward(ctx), _feature_to_device
    else:
        batches, to_device = _batches(ctx.val_loader, 0, ctx.spec.train["limit_batches"]), _to_device
    for _, x, y in batches:
        x, y = to_device(ctx, x, y)
        with ctx.runtime.autocast():
            logits = forward(x).float()
        if position + len(y) > unique:  # repeats added by the distributed sampler
            keep = unique - position
            logits, y = logits[:keep], y[:keep]
        position += len(y)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
        if k > 5:
            top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
    ctx.model.train(was_training)
    env = ctx.dist
    confusion = env.sum_(confusion.to(env.device)).cpu().reshape(k, k)
    loss_sum, top5 = env.sum_(torch.stack([loss_sum, top5.double()]).to(env.device)).tolist()
    seen = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return EpochResult(loss=loss_sum / max(seen, 1), acc=int(confusion.diag().sum()) / max(seen, 1), seen=seen,
                       seconds=time.perf_counter() - start, top5=top5 / max(seen, 1) if k > 5 else None,
                       confusion=confusion, per_class=per_class)


# --------------------------------------------------------------------------- set-up
def prepare(spec: Spec, *, device: str | None = None, runs_root: Path | None = None,
            env: Distributed | None = None) -> Context:
    """Build model, data, optimizer and friends for a run (no files written).

    Under torchrun (or with `env`), joins the process group, shards both loaders and wraps the
    model for data parallelism; otherwise everything runs in this process as before.
    """
    runtime = make_runtime(spec, device)
    env = env if env is not None else distributed.setup(runtime.device)
    # per-process streams for dropout and the like; rank 0 matches a single-process run
    seed_everything(spec.seed + env.rank)
    built = build(spec, runs_root=runs_root)
    config = dict(built.data_config)
    config["input_size"] = (3, spec.data["image_size"], spec.data["image_size"])
    data = build_data(spec, config)
    if len(data.classes) != built.num_classes:
        raise spec.error(("model", "num_classes"), f"the model has {built.num_classes} outputs but the data has "
                         f"{len(data.classes)} classes", found=str(spec.model.num_classes),
                         expected=f"num_classes: {len(data.classes)}")
    model = built.model
    if env.enabled and spec.train["sync_bn"]:
        if runtime.device.type == "cuda":
            model = distributed.convert_sync_bn(model)  # same parameter objects: groups still hold
        elif env.is_main:
            log.warning("train.sync_bn: SyncBatchNorm needs CUDA; on the CPU each process keeps its own "
                        "BatchNorm statistics, averaged at the end of every epoch")
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    distributed.broadcast_state(model, env)
    optimizer = build_optimizer(model, built.groups, spec.train, device_type=runtime.device.type, spec=spec)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    ema = None
    if spec.train["ema"]:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=spec.train["ema"])
    forward: Callable
    if env.enabled:
        forward = DataParallel(model, env, compile=runtime.compile)
    else:
        forward = Compiled(model, runtime.compile) if runtime.compile else model
    batch = spec.train["batch_size"]  # per process; the global batch is batch_size x world_size
    workers = spec.data["num_workers"]
    if len(data.val) == 0:
        raise spec.error(("data", "val_split"), "the validation set is empty", found=str(spec.data["val_split"]),
                         expected="a val_split above 0, or a dataset with its own validation split")
    shard = {"rank": env.rank, "world_size": env.world_size}
    # a last training batch of one sample would make BatchNorm fail; dropping a partial batch is harmless
    train_loader = make_loader(data.train, batch_size=batch, train=True, seed=spec.seed, num_workers=workers,
                               pin_memory=runtime.pin_memory, drop_last=len(data.train) > batch * env.world_size,
                               **shard)
    val_loader = make_loader(data.val, batch_size=batch, train=False, seed=spec.seed, num_workers=workers,
                             pin_memory=runtime.pin_memory, **shard)
    criterion = nn.CrossEntropyLoss(label_smoothing=spec.train["label_smoothing"])
    return Context(spec=spec, built=built, data=data, runtime=runtime, model=model, forward=forward,
                   optimizer=optimizer, scaler=scaler, plateau=Plateau.from_train(spec.train), ema=ema,
                   train_loader=train_loader, val_loader=val_loader, criterion=criterion, dist=env)


# --------------------------------------------------------------------------- checkpoints
def _rank_state(ctx: Context, partial: EpochState | None) -> dict[str, Any]:
    state: dict[str, Any] = {"rng": rng_state(), "partial": asdict(partial) if partial is not None else None}
    if ctx.dist.enabled:  # BatchNorm statistics differ between processes until the epoch ends
        state["buffers"] = {f"model.{n}": b.detach().cpu().clone() for n, b in ctx.model.named_buffers()}
        if ctx.ema is not None:
            state["buffers"].update({f"ema.{n}": b.detach().cpu().clone() for n, b in ctx.ema.module.named_buffers()})
    return state


def checkpoint_state(ctx: Context, epoch: int, best: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = (),
                     *, partial: EpochState | None = None) -> dict[str, Any] | None:
    """What `checkpoints/last.pt` holds to continue at `epoch` (mid-epoch when `partial` is given).

    Every process must call it (it gathers each one's RNG and partial sums); rank 0 gets the
    state, the others None.
    """
    ranks = ctx.dist.gather(_rank_state(ctx, partial))
    if not ctx.dist.is_main:
        return None
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "batch": partial.batch if partial is not None else 0,
        "model": ctx.model.state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict(),
        "plateau": ctx.plateau.state_dict(),
        "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
        "loaders": {"train": ctx.train_loader.state_dict(), "val": ctx.val_loader.state_dict()},
        "ranks": ranks,
        "world_size": ctx.dist.world_size,
        "best": dict(best),
        "rows": [dict(r) for r in rows],
        "spec": json.loads(json.dumps(ctx.spec.raw)),
    }


def restore(ctx: Context, state: Mapping[str, Any]) -> EpochState | None:
    """Load a checkpoint into `ctx`; return the partial epoch to continue, if it stopped mid-epoch."""
    ctx.model.load_state_dict(state["model"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scaler.load_state_dict(state["scaler"])
    ctx.plateau.load_state_dict(state["plateau"])
    if ctx.ema is not None and state.get("ema") is not None:
        ctx.ema.load_state_dict(state["ema"])
    if "loaders" in state:
        ctx.train_loader.load_state_dict(state["loaders"]["train"])
        ctx.val_loader.load_state_dict(state["loaders"]["val"])
    if "ranks" not in state:  # format 1: one process, epoch boundaries only
        set_rng_state(state["rng"])
        return None
    ranks = state["ranks"]
    same_world = len(ranks) == ctx.dist.world_size
    mine = ranks[ctx.dist.rank] if same_world else ranks[0]
    set_rng_state(mine["rng"])
    if same_world and mine.get("buffers"):
        with torch.no_grad():
            own = {f"model.{n}": b for n, b in ctx.model.named_buffers()}
            if ctx.ema is not None:
                own.update({f"ema.{n}": b for n, b in ctx.ema.module.named_buffers()})
            for name, value in mine["buffers"].items():
                own[name].copy_(value)
    if state.get("batch", 0) == 0 or mine["partial"] is None:
        return None
    return EpochState(**mine["partial"])


def _load_last(spec: Spec, path: Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same problem for the user
        raise SpecError(f"cannot resume: {path} is unreadable ({exc.__class__.__name__}: {str(exc)[:120]})",
                        file=str(path), expected="a checkpoint written by `surgery run`",
                        hint="start afresh with --overwrite") from None


def _first_difference(a: Any, b: Any, path: tuple = ()) -> tuple:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), path + (key,))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, path + (i,))
    return path


# --------------------------------------------------------------------------- progress
class Progress:
    """Rich progress bars on a terminal, one plain line per epoch elsewhere (CI, logs); silent off rank 0."""

    def __init__(self, console: Any, total_epochs: int, enabled: bool = True) -> None:
        self.console = console
        self.total = total_epochs
        self.enabled = enabled
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                    transient=True)
            self.bar.start()
            self.task = None

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch + 1}/{self.total}", total=steps, completed=done, info="")
            self._t0, self._n, self._loss = time.perf_counter(), 0, 0.0

    def step(self, loss: float, batch: int) -> None:
        if self.bar is not None:
            self._n += batch
            self._loss = loss if self._loss == 0.0 else 0.9 * self._loss + 0.1 * loss
            rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
            self.bar.update(self.task, advance=1, info=f"loss {self._loss:.3f}  {rate:.0f} img/s")

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _epoch_line(row: Mapping[str, Any], total: int) -> str:
    groups = "  ".join(f"{g}={'%.2g' % row['lr'][g] if on else 'frozen'}" for g, on in row["trainable"].items())
    top5 = f" top5 {row['val_top5']:.3f}" if row.get("val_top5") is not None else ""
    return (f"epoch {row['epoch'] + 1:>3}/{total}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}{top5}  [{groups}]  "
            f"{row['images_per_sec']:.0f} img/s  {row['seconds']:.1f}s")


# --------------------------------------------------------------------------- the run
@contextmanager
def _graceful_interrupt() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current batch, then checkpoint and stop.
    A second one: stop at once (the last checkpoint written stays intact).

    torchrun passes the signal it gets on to every worker; a scheduler's SIGTERM before a kill
    (SLURM, Kubernetes) is handled the same way.
    """
    hit = {"n": 0}
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        hit["n"] += 1
        if hit["n"] > 1:
            raise KeyboardInterrupt
    try:
        for s in signals:
            signal.signal(s, handler)
    except ValueError:  # not the main thread: keep Python's default
        pass
    try:
        yield lambda: hit["n"] > 0
    finally:
        for s, h in previous.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass


def _prepare_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"the run directory {out_dir} is a file")
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            raise SpecError(f"the run directory {out_dir} already holds a run", file=str(out_dir),
                            expected="a new run directory",
                            hint="continue it with --resume, write elsewhere with --out DIR, or replace it with --overwrite")
        try:
            shutil.rmtree(out_dir)
        except OSError as exc:
            raise RunDirError(f"cannot replace the run directory {out_dir}: {exc.strerror or exc}") from None
    check_writable(out_dir)
    if resume:
        remove_temporaries(out_dir)


def use_feature_cache(ctx: Context, flags: Mapping[str, bool], out_dir: Path | None = None) -> str:
    """Switch the head-only cache on or off for a new trainable set; return a line for the log.

    Only the head trains and nothing before it is random: the frozen body runs once over both
    sets and the head trains on its outputs (same order, same inputs as uncached). The body is
    frozen for as long as the trainable set stays the same, so the cache stays valid until then.
    """
    from .cache import build_cache, cache_key, plan

    ctx.features = None
    set_train_mode(ctx.model, ctx.built.groups, flags)
    ok, why = plan(ctx.model, ctx.built.head, ctx.data.deterministic_train, ctx.spec.train["cache_features"],
                   ctx.dist.world_size)
    if not ok:
        return f"head-only stage, running uncached: {why}" if why else ""
    head = ctx.built.head[0]
    rt = ctx.runtime
    key = cache_key(ctx.model, head, {"data": dict(ctx.spec.data), "seed": ctx.spec.seed, "classes": ctx.data.classes,
                                      "train": len(ctx.data.train), "val": len(ctx.data.val),
                                      "precision": rt.precision, "channels_last": rt.channels_last,
                                      "device": rt.device.type, "transform": repr(getattr(ctx.data.train, "transform", ""))})
    plain = lambda dataset: make_loader(dataset, batch_size=ctx.spec.train["batch_size"], train=False,  # noqa: E731
                                        seed=ctx.spec.seed, num_workers=ctx.spec.data["num_workers"],
                                        pin_memory=rt.pin_memory).epoch(0)
    built = build_cache(ctx.model, head, key, plain(ctx.data.train), len(ctx.data.train), plain(ctx.data.val),
                        len(ctx.data.val), lambda x, y: _to_device(ctx, x, y), rt.autocast,
                        out_dir / "cache" if out_dir is not None else None)
    set_train_mode(ctx.model, ctx.built.groups, flags)
    if isinstance(built, str):
        return f"head-only stage, running uncached: {built}"
    ctx.features = built
    return (f"head-only stage: {why}; the frozen body ran once over {len(built.train) + len(built.val)} images "
            f"in {built.seconds:.1f}s and the head trains on its cached outputs (cache {built.key}, {built.where})")


def run(spec: Spec, out_dir: Path, *, device: str | None = None, resume: bool = False, overwrite: bool = False,
        console: Any = None, on_step: StepHook | None = None, runs_root: Path | None = None,
        resume_hint: str | None = None) -> dict[str, Any]:
    """Train one spec into `out_dir`; return the summary (also written to summary.json).

    Under torchrun every process calls this; only rank 0 writes and prints.

    Args:
        resume: continue from ``checkpoints/last.pt`` (mid-epoch if it was interrupted there).
        on_step: called after every training batch with (epoch, batch, loss).
        resume_hint: the command that resumes this run, for messages (default: built from the spec's path).

    Raises:
        SpecError: the spec does not fit the model or data, or the run directory is taken;
        TrainingStopped: stopped on purpose, a resumable checkpoint kept;
        RunDirError: the run directory cannot be written.
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    out_dir = Path(out_dir)
    last_path = out_dir / "checkpoints" / "last.pt"
    env = distributed.setup(make_runtime(spec, device).device)
    main = env.is_main
    say = console.print if main else (lambda *a, **k: None)
    hint = resume_hint or (f"surgery run {shlex.quote(str(spec.source.file or out_dir / 'spec.yaml'))} "
                           f"--out {shlex.quote(str(out_dir))} --resume")
    env.on_main(lambda: _prepare_dir(out_dir, resume=resume, overwrite=overwrite))
    ctx = prepare(spec, device=device, runs_root=runs_root or out_dir.parent, env=env)
    total = spec.train["epochs"]
    start_epoch = 0
    partial: EpochState | None = None
    best: dict[str, Any] = {"epoch": None, "val_acc": -1.0}
    rows: list[dict[str, Any]] = []
    state = env.on_main(lambda: _load_last(spec, last_path) if resume and last_path.exists() else None)
    if state is not None:
        if state.get("spec") != json.loads(json.dumps(spec.raw)):
            where = format_path(_first_difference(state.get("spec"), json.loads(json.dumps(spec.raw))))
            raise SpecError(f"cannot resume: the spec differs from the one this run started with (at {where})",
                            file=str(last_path), expected=f"the spec in {out_dir / 'spec.yaml'}",
                            hint="resume with the same spec file and --set options, or start a new run")
        started_with = int(state.get("world_size", 1))
        if started_with != env.world_size and state.get("batch", 0):
            raise SpecError(f"cannot resume: this run stopped mid-epoch with {started_with} processes, "
                            f"and {env.world_size} are running now", file=str(last_path),
                            expected=f"{started_with} processes (torchrun --nproc_per_node ...)",
                            hint="resume with the same number of processes")
        if started_with != env.world_size:
            say(f"[yellow]note[/yellow]: this run started with {started_with} processes and resumes with "
                f"{env.world_size}: the data order changes from here on")
        partial = restore(ctx, state)
        start_epoch, best = int(state["epoch"]), dict(state["best"])
        rows = [r for r in (state.get("rows") or read_metrics(out_dir / "metrics.jsonl")) if r["epoch"] < start_epoch]
        env.on_main(lambda: write_metrics(out_dir / "metrics.jsonl", rows))
        where = f"epoch {start_epoch + 1}/{total}" + (f", batch {partial.batch + 1}" if partial else "")
        say(f"resuming {spec.name} at {where} from {last_path}")
        del state
    else:
        if resume:
            say(f"no checkpoint in {last_path}: starting {spec.name} from the first epoch")

        def write_start() -> None:
            write_text(out_dir / "spec.yaml", spec.to_yaml())
            write_json(out_dir / "load_report.json", ctx.built.report.to_dict())
            write_json(out_dir / "classes.json", ctx.data.classes)
        env.on_main(write_start)
    processes = f"; {env.world_size} processes x batch {spec.train['batch_size']}" if env.enabled else ""
    say(f"{spec.name}: {spec.model.backbone}, {len(ctx.built.inserted)} modules inserted, "
        f"{len(ctx.built.report.loaded)} pretrained tensors loaded; {ctx.data.describe}; {ctx.runtime.describe()}"
        f"{processes}", markup=False, soft_wrap=True)
    wall = time.perf_counter()
    progress = Progress(console, total, enabled=main)
    previous_flags: dict[str, bool] | None = None
    if partial is not None:
        kept = f"the last good checkpoint is {last_path} (epoch {start_epoch + 1}, batch {partial.batch})"
    elif start_epoch:
        kept = f"the last good checkpoint is {last_path} (end of epoch {start_epoch})"
    else:
        kept = "no checkpoint was written yet"
    try:
        with _graceful_interrupt() as interrupted:
            for epoch in range(start_epoch, total):
                flags = apply_trainable(ctx.model, ctx.built.groups, epoch)
                if flags != previous_flags:
                    # the forward re-wraps DDP (and recompiles) itself when it sees the new trainable set
                    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
                    previous_flags = flags
                    note = use_feature_cache(ctx, flags, out_dir)
                    if note:
                        say(f"epoch {epoch + 1}: {note}", markup=False, soft_wrap=True)
                lrs = lrs_at(spec, epoch, ctx.plateau.current)
                epoch_state = partial if partial is not None else EpochState()
                partial = None
                progress.start_epoch(epoch, ctx.steps, epoch_state.batch)

                def hook(e: int, s: int, loss: float) -> None:
                    progress.step(loss, spec.train["batch_size"] * env.world_size)
                    if on_step is not None:
                        on_step(e, s, loss)

                try:
                    result = train_epoch(ctx, epoch, flags, on_step=hook, stop=interrupted, state=epoch_state)
                except NonFiniteLoss as exc:
                    raise TrainingStopped(f"{exc}; {kept}. Lower the learning rate, or set train.nonfinite: skip "
                                          "to skip such batches") from None
                if result.stopped:
                    checkpoint = checkpoint_state(ctx, epoch, best, rows, partial=epoch_state)
                    env.on_main(lambda: save_torch(last_path, checkpoint))
                    progress.close()
                    raise TrainingStopped(f"interrupted in epoch {epoch + 1}/{total} after batch {epoch_state.batch} "
                                          f"of {ctx.steps}; saved {last_path}. Resume with: {hint}")
                _check_ranks(ctx, out_dir, epoch, kept)
                val = evaluate(ctx)
                ctx.plateau.step(val.loss)
                row = {"epoch": epoch, "train_loss": result.loss, "train_acc": result.acc, "val_loss": val.loss,
                       "val_acc": val.acc, "val_top5": val.top5, "lr": lrs, "trainable": flags,
                       "images_per_sec": result.seen / max(result.seconds, 1e-9), "seconds": result.seconds + val.seconds,
                       "data_wait_fraction": result.data_seconds / max(result.seconds, 1e-9),
                       "skipped_batches": result.skipped}
                if ctx.ema is not None:
                    row["val_acc_ema"] = evaluate(ctx, ctx.ema.module).acc
                rows.append(row)
                progress.line(_epoch_line(row, total))
                improved = val.acc > best["val_acc"]
                if improved:
                    best = {"epoch": epoch, "val_acc": val.acc, "val_loss": val.loss}
                checkpoint = checkpoint_state(ctx, epoch + 1, best, rows)

                def write_epoch() -> None:
                    if improved:
                        save_safetensors(out_dir / "checkpoints" / "best.safetensors", ctx.model.state_dict(),
                                         {"epoch": str(epoch), "val_acc": f"{val.acc:.6f}"})
                    write_metrics(out_dir / "metrics.jsonl", rows)
                    save_torch(last_path, checkpoint)
                env.on_main(write_epoch)
                del checkpoint
                kept = f"the last good checkpoint is {last_path} (end of epoch {epoch + 1})"
                # a signal that came during validation: the epoch is complete and saved, stop here
                if env.max_(torch.tensor([float(interrupted())], device=env.device)).item() and epoch + 1 < total:
                    progress.close()
                    raise TrainingStopped(f"interrupted after epoch {epoch + 1}/{total}; saved {last_path}. "
                                          f"Resume with: {hint}")
    except KeyboardInterrupt:
        raise TrainingStopped(f"stopped at once by a second interrupt; {kept}. Resume with: {hint}") from None
    finally:
        progress.close()
    final = evaluate(ctx)
    _check_ranks(ctx, out_dir, total - 1, kept)
    summary = _summary(ctx, rows, best, final, time.perf_counter() - wall)

    def write_final() -> None:
        save_safetensors(out_dir / "model.safetensors", ctx.model.state_dict(), {"spec": spec.name})
        if ctx.ema is not None:
            save_safetensors(out_dir / "model_ema.safetensors", ctx.ema.module.state_dict(), {"spec": spec.name})
        write_json(out_dir / "summary.json", summary)
        if rows:
            plot_curves(out_dir / "plots" / "curves.png", rows, unfreeze_events(spec))
        plot_confusion(out_dir / "plots" / "confusion.png", final.confusion, ctx.data.classes)
    env.on_main(write_final)
    say(f"[green]done[/green] {spec.name}: best val acc {best['val_acc']:.4f} at epoch "
        f"{(best['epoch'] or 0) + 1}, final {final.acc:.4f}; wrote {out_dir}", soft_wrap=True)
    return summary


def _check_ranks(ctx: Context, out_dir: Path, epoch: int, kept: str) -> None:
    """Stop loudly, with ``ranks_consistent: false`` in summary.json, if processes hold different weights."""
    env = ctx.dist
    states = {f"model.{k}": v for k, v in ctx.model.state_dict().items()}
    if ctx.ema is not None:
        states.update({f"ema.{k}": v for k, v in ctx.ema.module.state_dict().items()})
    differ = distributed.diverged(states, env)
    if not differ:
        return
    shown = ", ".join(differ[:5]) + (f" ... ({len(differ)} in all)" if len(differ) > 5 else "")
    message = (f"the {env.world_size} processes hold different weights after epoch {epoch + 1}: {shown}. "
               "This is a bug in the distributed set-up (please report it); the checkpoint of this epoch "
               f"was not written, {kept}")
    env.on_main(lambda: write_json(out_dir / "summary.json", {
        "name": ctx.spec.name, "ranks_consistent": False, "world_size": env.world_size,
        "diverged_after_epoch": epoch, "diverged_tensors": differ, "stopped": message}))
    raise TrainingStopped(message) from distributed.RanksDiverged(shown)


def _summary(ctx: Context, rows: list[dict[str, Any]], best: Mapping[str, Any], final: EpochResult,
             wall: float) -> dict[str, Any]:
    import platform

    import timm
    import torchvision

    return {
        "name": ctx.spec.name,
        "backbone": ctx.spec.model.backbone,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "final": rows[-1] if rows else None,
        "final_val_acc": final.acc,
        "final_val_loss": final.loss,
        "val_images": final.seen,
        "per_class_accuracy": dict(zip(ctx.data.classes, final.per_class)),
        "epochs": len(rows),
        "wall_seconds": wall,
        "device": str(ctx.runtime.device),
        "precision": ctx.runtime.precision,
        "channels_last": ctx.runtime.channels_last,
        "compiled": bool(ctx.runtime.compile),
        # processes, and whether their weights were bit-identical at the end (true for one process)
        "world_size": ctx.dist.world_size,
        "batch_size_per_process": ctx.spec.train["batch_size"],
        "global_batch_size": ctx.spec.train["batch_size"] * ctx.dist.world_size,
        "ranks_consistent": True,
        "data": ctx.data.describe,
        "params": {"total": sum(p.numel() for p in ctx.model.parameters()),
                   "inserted": sum(m["params"] for m in ctx.built.report.inserted_modules)},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def _resume_command(paths: Sequence[str], out: str | None, overrides: Sequence[str], device: str | None) -> str:
    _, _, world_size = distributed.world_from_env()
    if world_size > 1:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world_size))
        head = ["torchrun", "--nproc_per_node", per_node]
        if int(per_node) != world_size:  # several nodes: their rendezvous options are the user's
            head += ["--nnodes", str(world_size // max(int(per_node), 1)), "..."]
        else:
            head.insert(1, "--standalone")
        head += ["-m", "surgery", "run"]
    else:
        head = ["surgery", "run"]
    args = list(paths) + (["--out", out] if out else []) + (["--device", device] if device else [])
    for item in overrides:
        args += ["--set", item]
    return shlex.join(head + args + ["--resume"])


def run_specs(paths: Sequence[str], *, out: str | None = None, overrides: Sequence[str] = (), device: str | None = None,
              resume: bool = False, overwrite: bool = False) -> int:
    """The `surgery run` command: each spec in turn; a later spec can load an earlier one's weights (run:NAME).

    Under torchrun, every process runs this; errors are printed by rank 0 only and every process
    returns the same exit code (2 for a spec mistake, 1 for a stopped run or an unwritable folder).
    """
    from rich.console import Console

    console = Console(highlight=False)
    main = distributed.world_from_env()[0] == 0
    hint = _resume_command(paths, out, overrides, device)
    try:
        specs = [load_spec(p, overrides) for p in paths]  # every spec checked before anything trains
        if main:
            from .cli import print_warnings

            for spec in specs:
                print_warnings(spec)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SpecError("two specs share a run name", found=", ".join(names), expected="distinct names",
                            hint="set `name:` in the specs")
        for spec in specs:
            out_dir = Path(out) if (out and len(specs) == 1) else Path(out or "runs") / spec.name
            try:
                run(spec, out_dir, device=device, resume=resume, overwrite=overwrite, console=console,
                    runs_root=out_dir.parent, resume_hint=hint)
            except (TrainingStopped, RunDirError) as exc:
                if main:
                    from rich.markup import escape

                    console.print(f"[bold red]stopped[/bold red] {escape(spec.name)}: {escape(str(exc))}", soft_wrap=True)
                return 1
    except SpecError:
        if main:
            raise
        return 2  # rank 0 says it
    finally:
        distributed.teardown()
    return 0
