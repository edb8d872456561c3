"""`surgery run`: fine-tune a surgered model with per-group learning rates and unfreeze epochs.

The loop reads top to bottom. Per-epoch decisions (which groups train, each group's lr) come
from the pure functions of `schedule.py`; the only state carried between epochs is what the
checkpoint holds (weights, optimizer, scaler, EMA, plateau factor, RNG states), so a resumed run
continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .builder import Built, build
from .data import DataBundle, build_data, make_loader, normalize
from .errors import SpecError
from .groups import ResolvedGroup
from .optim import build_optimizer, set_lrs
from .rundir import (RunDirError, check_writable, plot_confusion, plot_curves, read_metrics, save_safetensors,
                     save_torch, write_json, write_metrics, write_text)
from .runtime import Compiled, Runtime, make_runtime, rng_state, seed_everything, set_rng_state
from .schedule import Plateau, lrs_at, unfreeze_events
from .spec import Spec, load_spec

StepHook = Callable[[int, int, float], None]


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss, interrupt) after keeping a good checkpoint."""


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


def _batches(loader: Any, epoch: int, limit: int | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for step, (x, y) in enumerate(loader.epoch(epoch)):
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


def train_epoch(ctx: Context, epoch: int, flags: Mapping[str, bool], *, on_step: StepHook | None = None,
                stop: Callable[[], bool] = lambda: False) -> EpochResult:
    spec, train = ctx.spec, ctx.spec.train
    set_train_mode(ctx.model, ctx.built.groups, flags)
    any_trainable = any(flags.values())
    limit = train["limit_batches"]
    steps = min(len(ctx.train_loader), limit) if limit else len(ctx.train_loader)
    per_step = train["scheduler"]["per_step"]
    set_lrs(ctx.optimizer, lrs_at(spec, epoch, ctx.plateau.current))
    loss_sum = torch.zeros((), device=ctx.runtime.device, dtype=torch.float64)
    correct = torch.zeros((), device=ctx.runtime.device, dtype=torch.int64)
    seen = skipped = 0
    data_seconds = 0.0
    start = time.perf_counter()
    fetched = start
    for step, x, y in _batches(ctx.train_loader, epoch, limit):
        data_seconds += time.perf_counter() - fetched
        if per_step and step:
            set_lrs(ctx.optimizer, lrs_at(spec, epoch + step / steps, ctx.plateau.current))
        x, y = _to_device(ctx, x, y)
        with ctx.runtime.autocast(), torch.set_grad_enabled(any_trainable):
            logits = ctx.forward(x)
            loss = ctx.criterion(logits.float(), y)
        if not torch.isfinite(loss):
            if train["nonfinite"] == "skip":
                skipped += 1
                ctx.optimizer.zero_grad(set_to_none=True)
                fetched = time.perf_counter()
                continue
            raise TrainingStopped(f"the loss became {loss.item()} at epoch {epoch}, batch {step}; "
                                  "the last good checkpoint is kept (train.nonfinite: skip skips such batches)")
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
        if stop():
            break
        fetched = time.perf_counter()
    seconds = time.perf_counter() - start
    return EpochResult(loss=float(loss_sum) / max(seen, 1), acc=int(correct) / max(seen, 1), seen=seen,
                       seconds=seconds, data_seconds=data_seconds, skipped=skipped)


@torch.no_grad()
def evaluate(ctx: Context, model_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EpochResult:
    """Validation loss, top-1, top-5 (more than 5 classes) and the confusion matrix."""
    was_training = ctx.model.training
    ctx.model.eval()
    forward = model_fn or ctx.forward
    k = len(ctx.data.classes)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum, top5, seen = 0.0, 0, 0
    start = time.perf_counter()
    for _, x, y in _batches(ctx.val_loader, 0, ctx.spec.train["limit_batches"]):
        x, y = _to_device(ctx, x, y)
        with ctx.runtime.autocast():
            logits = forward(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1)
        confusion += torch.bincount((y * k + pred).cpu(), minlength=k * k).reshape(k, k)
        if k > 5:
            top5 += int((logits.topk(5, dim=1).indices == y[:, None]).any(1).sum())
        seen += y.shape[0]
    ctx.model.train(was_training)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return EpochResult(loss=loss_sum / max(seen, 1), acc=int(confusion.diag().sum()) / max(seen, 1), seen=seen,
                       seconds=time.perf_counter() - start, top5=top5 / max(seen, 1) if k > 5 else None,
                       confusion=confusion, per_class=per_class)


# --------------------------------------------------------------------------- set-up
def prepare(spec: Spec, *, device: str | None = None, runs_root: Path | None = None) -> Context:
    """Build model, data, optimizer and friends for a run (no files written)."""
    seed_everything(spec.seed)
    runtime = make_runtime(spec, device)
    built = build(spec, runs_root=runs_root)
    config = dict(built.data_config)
    config["input_size"] = (3, spec.data["image_size"], spec.data["image_size"])
    data = build_data(spec, config)
    if len(data.classes) != built.num_classes:
        raise spec.error(("model", "num_classes"), f"the model has {built.num_classes} outputs but the data has "
                         f"{len(data.classes)} classes", found=str(spec.model.num_classes),
                         expected=f"num_classes: {len(data.classes)}")
    model = built.model.to(runtime.device, memory_format=runtime.memory_format)
    optimizer = build_optimizer(model, built.groups, spec.train, device_type=runtime.device.type, spec=spec)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    ema = None
    if spec.train["ema"]:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=spec.train["ema"])
    forward: Callable = Compiled(model, runtime.compile) if runtime.compile else model
    batch = spec.train["batch_size"]
    workers = spec.data["num_workers"]
    if len(data.val) == 0:
        raise spec.error(("data", "val_split"), "the validation set is empty", found=str(spec.data["val_split"]),
                         expected="a val_split above 0, or a dataset with its own validation split")
    # a last training batch of one sample would make BatchNorm fail; dropping a partial batch is harmless
    train_loader = make_loader(data.train, batch_size=batch, train=True, seed=spec.seed, num_workers=workers,
                               pin_memory=runtime.pin_memory, drop_last=len(data.train) > batch)
    val_loader = make_loader(data.val, batch_size=batch, train=False, seed=spec.seed, num_workers=workers,
                             pin_memory=runtime.pin_memory)
    criterion = nn.CrossEntropyLoss(label_smoothing=spec.train["label_smoothing"])
    return Context(spec=spec, built=built, data=data, runtime=runtime, model=model, forward=forward,
                   optimizer=optimizer, scaler=scaler, plateau=Plateau.from_train(spec.train), ema=ema,
                   train_loader=train_loader, val_loader=val_loader, criterion=criterion)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_state(ctx: Context, next_epoch: int, best: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": 1,
        "epoch": next_epoch,
        "model": ctx.model.state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict(),
        "plateau": ctx.plateau.state_dict(),
        "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
        "rng": rng_state(),
        "best": dict(best),
        "spec": json.loads(json.dumps(ctx.spec.raw)),
    }


def restore(ctx: Context, state: Mapping[str, Any]) -> None:
    ctx.model.load_state_dict(state["model"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scaler.load_state_dict(state["scaler"])
    ctx.plateau.load_state_dict(state["plateau"])
    if ctx.ema is not None and state.get("ema") is not None:
        ctx.ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])


def _load_last(spec: Spec, path: Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same problem for the user
        raise SpecError(f"cannot resume: {path} is unreadable ({exc.__class__.__name__}: {str(exc)[:120]})",
                        file=str(path), expected="a checkpoint written by `surgery run`",
                        hint="start afresh with --overwrite") from None


# --------------------------------------------------------------------------- progress
class Progress:
    """Rich progress bars on a terminal, one plain line per epoch elsewhere (CI, logs)."""

    def __init__(self, console: Any, total_epochs: int) -> None:
        self.console = console
        self.total = total_epochs
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                    transient=True)
            self.bar.start()
            self.task = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch + 1}/{self.total}", total=steps, info="")
            self._t0, self._n, self._loss = time.perf_counter(), 0, 0.0

    def step(self, loss: float, batch: int) -> None:
        if self.bar is not None:
            self._n += batch
            self._loss = loss if self._loss == 0.0 else 0.9 * self._loss + 0.1 * loss
            rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
            self.bar.update(self.task, advance=1, info=f"loss {self._loss:.3f}  {rate:.0f} img/s")

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _epoch_line(row: Mapping[str, Any], total: int) -> str:
    groups = "  ".join(f"{g}={'%.2g' % row['lr'][g] if on else 'frozen'}" for g, on in row["trainable"].items())
    top5 = f" top5 {row['val_top5']:.3f}" if row.get("val_top5") is not None else ""
    return (f"epoch {row['epoch'] + 1:>3}/{total}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}{top5}  [{groups}]  "
            f"{row['images_per_sec']:.0f} img/s  {row['seconds']:.1f}s")


# --------------------------------------------------------------------------- the run
@contextmanager
def _graceful_interrupt() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C: finish the current batch, then stop and checkpoint. Second: stop at once."""
    hit = {"n": 0}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        hit["n"] += 1
        if hit["n"] > 1:
            raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: keep Python's default
        pass
    try:
        yield lambda: hit["n"] > 0
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def run(spec: Spec, out_dir: Path, *, device: str | None = None, resume: bool = False, overwrite: bool = False,
        console: Any = None, on_step: StepHook | None = None, runs_root: Path | None = None) -> dict[str, Any]:
    """Train one spec into `out_dir`; return the summary (also written to summary.json).

    Raises:
        SpecError: the spec does not fit the model or data; TrainingStopped: stopped on purpose;
        RunDirError: the run directory cannot be written.
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    out_dir = Path(out_dir)
    last_path = out_dir / "checkpoints" / "last.pt"
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            raise SpecError(f"the run directory {out_dir} already holds a run", file=str(out_dir),
                            expected="a new run directory",
                            hint="continue it with --resume, write elsewhere with --out DIR, or replace it with --overwrite")
        shutil.rmtree(out_dir)
    check_writable(out_dir)
    ctx = prepare(spec, device=device, runs_root=runs_root or out_dir.parent)
    total = spec.train["epochs"]
    start_epoch = 0
    best: dict[str, Any] = {"epoch": None, "val_acc": -1.0}
    rows: list[dict[str, Any]] = []
    if resume and last_path.exists():
        state = _load_last(spec, last_path)
        if state.get("spec") != json.loads(json.dumps(spec.raw)):
            raise SpecError("cannot resume: the spec differs from the one this run started with", file=str(last_path),
                            expected=f"the spec in {out_dir / 'spec.yaml'}",
                            hint="resume with that spec (`surgery run " + str(out_dir / "spec.yaml") + " --resume --out " +
                                 str(out_dir) + "`), or start a new run")
        restore(ctx, state)
        start_epoch, best = int(state["epoch"]), dict(state["best"])
        rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["epoch"] < start_epoch]
        console.print(f"resuming {spec.name} at epoch {start_epoch + 1}/{total} from {last_path}")
    else:
        write_text(out_dir / "spec.yaml", spec.to_yaml())
        write_json(out_dir / "load_report.json", ctx.built.report.to_dict())
        write_json(out_dir / "classes.json", ctx.data.classes)
    console.print(f"{spec.name}: {spec.model.backbone}, {len(ctx.built.inserted)} modules inserted, "
                  f"{len(ctx.built.report.loaded)} pretrained tensors loaded; {ctx.data.describe}; {ctx.runtime.describe()}",
                  markup=False, soft_wrap=True)
    wall = time.perf_counter()
    progress = Progress(console, total)
    previous_flags: dict[str, bool] | None = None
    try:
        with _graceful_interrupt() as interrupted:
            for epoch in range(start_epoch, total):
                flags = apply_trainable(ctx.model, ctx.built.groups, epoch)
                if flags != previous_flags:
                    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
                    previous_flags = flags
                lrs = lrs_at(spec, epoch, ctx.plateau.current)
                steps = len(ctx.train_loader) if not spec.train["limit_batches"] else min(len(ctx.train_loader), spec.train["limit_batches"])
                progress.start_epoch(epoch, steps)

                def hook(e: int, s: int, loss: float) -> None:
                    progress.step(loss, spec.train["batch_size"])
                    if on_step is not None:
                        on_step(e, s, loss)

                result = train_epoch(ctx, epoch, flags, on_step=hook, stop=interrupted)
                if interrupted():
                    raise KeyboardInterrupt
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
                if val.acc > best["val_acc"]:
                    best = {"epoch": epoch, "val_acc": val.acc, "val_loss": val.loss}
                    save_safetensors(out_dir / "checkpoints" / "best.safetensors", ctx.model.state_dict(),
                                     {"epoch": str(epoch), "val_acc": f"{val.acc:.6f}"})
                write_metrics(out_dir / "metrics.jsonl", rows)
                save_torch(last_path, checkpoint_state(ctx, epoch + 1, best))
    except KeyboardInterrupt:
        progress.close()
        raise TrainingStopped(f"interrupted; the last complete epoch is saved in {last_path}. Resume with: "
                              f"surgery run {out_dir / 'spec.yaml'} --out {out_dir} --resume") from None
    finally:
        progress.close()
    final = evaluate(ctx)
    save_safetensors(out_dir / "model.safetensors", ctx.model.state_dict(), {"spec": spec.name})
    if ctx.ema is not None:
        save_safetensors(out_dir / "model_ema.safetensors", ctx.ema.module.state_dict(), {"spec": spec.name})
    summary = _summary(ctx, rows, best, final, time.perf_counter() - wall)
    write_json(out_dir / "summary.json", summary)
    if rows:
        plot_curves(out_dir / "plots" / "curves.png", rows, unfreeze_events(spec))
    plot_confusion(out_dir / "plots" / "confusion.png", final.confusion, ctx.data.classes)
    console.print(f"[green]done[/green] {spec.name}: best val acc {best['val_acc']:.4f} at epoch "
                  f"{(best['epoch'] or 0) + 1}, final {final.acc:.4f}; wrote {out_dir}")
    return summary


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
        "per_class_accuracy": dict(zip(ctx.data.classes, final.per_class)),
        "epochs": len(rows),
        "wall_seconds": wall,
        "device": str(ctx.runtime.device),
        "precision": ctx.runtime.precision,
        "channels_last": ctx.runtime.channels_last,
        "compiled": bool(ctx.runtime.compile),
        "data": ctx.data.describe,
        "params": {"total": sum(p.numel() for p in ctx.model.parameters()),
                   "inserted": sum(m["params"] for m in ctx.built.report.inserted_modules)},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def run_specs(paths: Sequence[str], *, out: str | None = None, overrides: Sequence[str] = (), device: str | None = None,
              resume: bool = False, overwrite: bool = False) -> int:
    """The `surgery run` command: each spec in turn; a later spec can load an earlier one's weights (run:NAME)."""
    from rich.console import Console

    console = Console(highlight=False)
    specs = [load_spec(p, overrides) for p in paths]  # every spec checked before anything trains
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError("two specs share a run name", found=", ".join(names), expected="distinct names",
                        hint="set `name:` in the specs")
    for spec in specs:
        out_dir = Path(out) if (out and len(specs) == 1) else Path(out or "runs") / spec.name
        try:
            run(spec, out_dir, device=device, resume=resume, overwrite=overwrite, console=console,
                runs_root=out_dir.parent)
        except (TrainingStopped, RunDirError) as exc:
            console.print(f"[bold red]stopped[/bold red] {spec.name}: {exc}")
            return 1
    return 0
