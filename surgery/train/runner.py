"""`run`: fine-tune one spec into a run directory. The epoch loop reads top to bottom.

Per-epoch decisions (which groups train, each group's lr) come from the pure functions of
`schedule.py`; the only state carried between epochs is what the checkpoint holds
(`checkpoint.py`), so a resumed run continues exactly where it stopped. What validation decides
(a plateau rule unfreezing a group, early stopping) is stepped once per epoch, after validation,
and saved with that epoch.

Under torchrun the same loop runs in every process (see `surgery.train.distributed`): batches are
sharded, metrics are summed over processes, only rank 0 writes and prints, and the ranks'
parameters are compared bit for bit after every epoch. ``train.batch_size`` is per process.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..data import split_record
from ..files import write_json, write_text
from ..runs import layout
from ..runs.reader import read_metrics
from ..runs.writer import RunDir, load_safetensors, save_safetensors, save_torch, snapshot, write_metrics
from ..spec import Spec
from .autotune import Candidate
from .checkpoint import check_resumable, checkpoint_state, load_checkpoint, restore
from .context import Context, prepare
from .distributed import RanksDiverged, broadcast_state, diverged, setup
from .features import use_feature_cache
from .final import write_drawn_files
from .loop import (
    EpochResult,
    EpochState,
    NonFiniteLoss,
    StepHook,
    TrainingStopped,
    apply_trainable,
    evaluate,
    train_epoch,
)
from .mixing import DOMINANT, MULTI_LABEL_ACC
from .optim import layer_lrs
from .progress import Progress, epoch_line
from .runtime import make_runtime
from .schedule import lrs_at
from .summary import summary_of
from .trackers import Trackers


@dataclass
class Journey:
    """Where the run stands: the epoch to train next, the best so far, every metrics row, and the
    sentence that says which checkpoint survives if it stops now."""

    epoch: int = 0
    partial: EpochState | None = None  # a mid-epoch resume continues this epoch's sums
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "val_acc": -1.0})
    rows: list[dict[str, Any]] = field(default_factory=list)
    kept: str = "no checkpoint was written yet"
    pruned: dict[str, Any] | None = None  # stopped by the `on_epoch` hook (a sweep's pruner): why, after which epoch
    last_val: EpochResult | None = None  # the last epoch's validation: the final model's, unless it changes


# after each epoch, with every metrics row so far and the epochs planned: None to go on, or why to stop
# (a sweep's pruner); the run then finishes with the last epoch's weights and summary.json's `pruned`
EpochHook = Callable[[list, int], "str | None"]


def run(
    spec: Spec,
    out_dir: Path,
    *,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    console: Any = None,
    on_step: StepHook | None = None,
    on_epoch: EpochHook | None = None,
    runs_root: Path | None = None,
    resume_hint: str | None = None,
) -> dict[str, Any]:
    """Train one spec into `out_dir`; return the summary (also written to summary.json).

    Under torchrun every process calls this; only rank 0 writes and prints.

    Args:
        resume: continue from ``checkpoints/last.pt`` (mid-epoch if it was interrupted there).
        overwrite: replace a run already in `out_dir`, once this one has been built and started.
        on_step: called after every training batch with (epoch, batch, loss).
        on_epoch: called after every epoch is saved, with the metrics rows so far and the epochs
            planned; a reason it returns stops the run there (not after the last epoch), finished
            with that epoch's weights and `pruned` in summary.json (a sweep's pruner uses it).
        resume_hint: the command that resumes this run, for messages (default: built from the spec's path).

    Raises:
        SpecError: the spec does not fit the model or data;
        RunDirError: the run directory is taken, locked by another run or cannot be written;
        TrainingStopped: stopped on purpose, a resumable checkpoint kept.
    """
    from ..untrusted import Console

    console = console or Console(highlight=False)
    env = setup(make_runtime(spec, device).device)
    say = console.print if env.is_main else (lambda *a, **k: None)
    hint = resume_hint or (
        f"surgery run {shlex.quote(str(spec.source.file or Path(out_dir) / 'spec.yaml'))} "
        f"--out {shlex.quote(str(out_dir))} --resume"
    )
    rundir = RunDir(out_dir)
    env.on_main(lambda: rundir.claim(resume=resume, overwrite=overwrite))
    try:
        settings = resumed_settings(rundir.path) if resume else None
        ctx = prepare(spec, device=device, runs_root=runs_root or rundir.path.parent, env=env, settings=settings)
        journey = _begin(ctx, rundir, resume, say)
        with Trackers(
            spec, rundir.folder, journey.rows, env=env, say=lambda text: say(text, markup=False, soft_wrap=True)
        ) as trackers:
            wall = time.perf_counter()
            progress = Progress(console, spec.train.epochs, enabled=env.is_main)
            try:
                _train(ctx, rundir, journey, progress, say, hint, (on_step, on_epoch), trackers)
            finally:
                progress.close()
            return _finish(ctx, rundir, journey, time.perf_counter() - wall, say, trackers)
    finally:
        if env.is_main:
            rundir.release()


def _begin(ctx: Context, rundir: RunDir, resume: bool, say: Callable) -> Journey:
    """Restore the checkpoint when resuming, or write the new run's first files; then start the run
    directory (a new run's staging folder takes its place only now, once everything is built)."""
    spec, env, journey = ctx.spec, ctx.dist, Journey()
    last = rundir.checkpoint
    state = env.on_main(lambda: load_checkpoint(last) if resume and last.exists() else None)
    if state is not None:
        note = check_resumable(state, spec, last, rundir.path, env.world_size)
        if note:
            say(f"[yellow]note[/yellow]: {note}")
        journey.partial = restore(ctx, state)
        journey.epoch, journey.best = int(state["epoch"]), dict(state["best"])
        journey.rows = [
            r for r in (state.get("rows") or read_metrics(rundir.folder / layout.METRICS)) if r["epoch"] < journey.epoch
        ]
        env.on_main(lambda: write_metrics(rundir.folder / layout.METRICS, journey.rows))
        journey.kept = _kept(last, journey.epoch, journey.partial)
        say(_resuming(spec, journey, last, ctx.early_stop.stopped_at))
    else:
        if resume:
            say(f"no checkpoint in {last}: starting {spec.name} from the first epoch")

        def write_start() -> None:
            write_text(rundir.folder / layout.SPEC, spec.to_yaml())
            write_json(rundir.folder / layout.LOAD_REPORT, ctx.built.report.to_dict())
            write_json(rundir.folder / layout.TUNING, ctx.tuning.record())
            write_json(rundir.folder / layout.CLASSES, ctx.data.classes)
            write_json(
                rundir.folder / layout.SPLITS,
                split_record(spec, {"train": ctx.data.train, "val": ctx.data.val, "test": ctx.data.test}),
            )
            rundir.start()

        env.on_main(write_start)
    processes = f"; {env.world_size} processes x batch {spec.train.batch_size}" if env.enabled else ""
    say(
        f"{spec.name}: {spec.model.backbone}, {len(ctx.built.inserted)} modules inserted, "
        + (f"{len(ctx.built.adapters)} LoRA adapters, " if ctx.built.adapters else "")
        + f"{len(ctx.built.report.loaded)} pretrained tensors loaded; {ctx.data.describe}; {ctx.runtime.describe()}"
        f"{processes}",
        markup=False,
        soft_wrap=True,
    )
    if ctx.tuning.describe():
        say(ctx.tuning.describe(), markup=False, soft_wrap=True)
    for note in ctx.built.notes:
        say(f"note: {note}", markup=False, soft_wrap=True)
    if ctx.regularizer is not None:
        say(ctx.regularizer.describe(), markup=False, soft_wrap=True)
    return journey


def resumed_settings(folder: Path) -> Candidate | str | None:
    """The settings a run decided when it started (its tuning.json), which its resume keeps, so
    that it continues with the same numerics; "provisional" for a checkpoint from before
    tuning.json (what `auto` meant then); None without a checkpoint (they are decided afresh)."""
    try:
        chosen = json.loads((Path(folder) / layout.TUNING).read_text(encoding="utf-8"))["chosen"]
        return Candidate(bool(chosen["channels_last"]), str(chosen["precision"]), chosen["compile"])
    except (OSError, ValueError, KeyError, TypeError):
        return "provisional" if (Path(folder) / layout.LAST).is_file() else None


def _resuming(spec: Spec, journey: Journey, last: Path, stopped_at: int | None = None) -> str:
    total = spec.train.epochs
    if stopped_at is not None:  # stopped early: it does not train on
        return (
            f"resuming {spec.name}: it stopped early after epoch {stopped_at + 1}/{total}; writing the final "
            f"files from {last}"
        )
    if journey.epoch >= total:  # killed while writing the final files: only those are left to do
        return f"resuming {spec.name}: all {total} epochs are trained; writing the final files from {last}"
    where = f"epoch {journey.epoch + 1}/{total}" + (f", batch {journey.partial.batch + 1}" if journey.partial else "")
    return f"resuming {spec.name} at {where} from {last}"


def _kept(last: Path, epoch: int, partial: EpochState | None) -> str:
    if partial is not None:
        return f"the last good checkpoint is {last} (epoch {epoch + 1}, batch {partial.batch})"
    return f"the last good checkpoint is {last} (end of epoch {epoch})" if epoch else "no checkpoint was written yet"


def _train(
    ctx: Context,
    rundir: RunDir,
    journey: Journey,
    progress: Progress,
    say: Callable,
    hint: str,
    hooks: tuple[StepHook | None, EpochHook | None],
    trackers: Trackers,
) -> None:
    """The epoch loop: unfreeze, train, check the ranks, validate, save; stop cleanly on a signal."""
    spec, env, total = ctx.spec, ctx.dist, ctx.spec.train.epochs
    on_step, on_epoch = hooks
    flags_before: dict[str, bool] | None = None

    def hook(epoch: int, step: int, loss: float) -> None:
        progress.step(loss, spec.train.batch_size * env.world_size)
        if on_step is not None:
            on_step(epoch, step, loss)

    if ctx.early_stop.stopped_at is not None:
        return  # a run that stopped early, resumed: only its final files are left to write
    try:
        with _graceful_interrupt() as interrupted:
            for epoch in range(journey.epoch, total):
                # --- which groups train: the forward re-wraps DDP (and recompiles) itself on a change
                flags = apply_trainable(ctx.model, ctx.built.groups, epoch, ctx.unfreeze.starts)
                if flags != flags_before:
                    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
                    flags_before = flags
                    notes = [use_feature_cache(ctx, flags, rundir.folder)]
                    if ctx.regularizer is not None:  # which distillation terms have a gradient now
                        notes.append(ctx.regularizer.update(ctx.model))
                    for note in filter(None, notes):
                        say(f"epoch {epoch + 1}: {note}", markup=False, soft_wrap=True)
                # --- one epoch of training, resumed mid-epoch if it was interrupted there
                state, journey.partial = journey.partial or EpochState(), None
                progress.start_epoch(epoch, ctx.steps, state.batch)
                try:
                    result = train_epoch(ctx, epoch, flags, on_step=hook, stop=interrupted, state=state)
                except NonFiniteLoss as exc:
                    raise TrainingStopped(
                        f"{exc}; {journey.kept}. Lower the learning rate, or set "
                        "train.nonfinite: skip to skip such batches"
                    ) from None
                if result.stopped:
                    _save_interrupted(ctx, rundir, journey, epoch, state)
                    raise TrainingStopped(
                        f"interrupted in epoch {epoch + 1}/{total} after batch {state.batch} "
                        f"of {ctx.steps}; saved {rundir.checkpoint}. Resume with: {hint}"
                    )
                # --- validate, record, save
                _check_ranks(ctx, rundir, epoch, journey.kept)
                row, val = _validate(ctx, epoch, flags, result)
                journey.last_val = val if epoch == total - 1 else None
                progress.line(epoch_line(row, total))
                for line in _decide(ctx, epoch, row):
                    say(line, markup=False, soft_wrap=True)
                _save_epoch(ctx, rundir, journey, row)
                trackers.log_epoch(journey.rows)
                if ctx.early_stop.stopped_at is not None or _pruned(journey, on_epoch, epoch, total, say):
                    break
                # a signal that came during validation: the epoch is complete and saved, stop here
                if env.max_(torch.tensor([float(interrupted())], device=env.device)).item() and epoch + 1 < total:
                    raise TrainingStopped(
                        f"interrupted after epoch {epoch + 1}/{total}; saved {rundir.checkpoint}. Resume with: {hint}"
                    )
    except KeyboardInterrupt:
        raise TrainingStopped(f"stopped at once by a second interrupt; {journey.kept}. Resume with: {hint}") from None


def _pruned(journey: Journey, on_epoch: EpochHook | None, epoch: int, total: int, say: Callable) -> bool:
    """Ask the epoch hook (a sweep's pruner) whether to stop after this epoch; never after the last."""
    why = on_epoch(journey.rows, total) if on_epoch is not None else None
    if not why or epoch + 1 >= total:
        return False
    journey.pruned = {"after_epoch": epoch, "epochs": total, "why": why}
    say(f"pruned after epoch {epoch + 1}/{total}: {why}", markup=False, soft_wrap=True)
    return True


def _validate(
    ctx: Context, epoch: int, flags: Mapping[str, bool], result: EpochResult
) -> tuple[dict[str, Any], EpochResult]:
    """Evaluate after an epoch, step the plateau tracker; return the epoch's metrics row and the evaluation."""
    lrs = lrs_at(ctx.spec, epoch, ctx.plateau.current, ctx.unfreeze.starts)
    val = evaluate(ctx)
    ctx.plateau.step(val.loss)
    row = {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_acc": result.acc,
        # with mixup an image holds two labels: train_acc counts the one with the larger share
        "train_acc_basis": _acc_basis(ctx.spec),
        "val_loss": val.loss,
        "val_acc": val.acc,
        "val_top5": val.top5,
        "lr": lrs,
        **({"layer_lr": layer} if (layer := layer_lrs(ctx.built.groups, lrs)) else {}),
        "trainable": dict(flags),
        "images_per_sec": result.seen / max(result.seconds, 1e-9),
        "seconds": result.seconds + val.seconds,
        "data_wait_fraction": result.data_seconds / max(result.seconds, 1e-9),
        "skipped_batches": result.skipped,
    }
    if ctx.regularizer is not None:  # each term as it entered the loss, per image; None: not computed
        row.update({f"reg_{k}": result.terms.get(k) for k in ctx.regularizer.names})
        row["reg_teacher_seconds"] = ctx.regularizer.take_teacher_seconds()
    if val.mean_ap is not None:  # multi-label: acc is the exact-match ratio, the best epoch has the best mAP
        row.update(
            val_map=val.mean_ap,
            val_macro_f1=sum(val.per_class) / max(len(val.per_class), 1),
            val_f1=dict(zip(ctx.data.classes, val.per_class)),
        )
    if ctx.ema is not None:
        ema = evaluate(ctx, ctx.ema.module)
        row["val_acc_ema"] = ema.acc
        if ema.mean_ap is not None:
            row["val_map_ema"] = ema.mean_ap
    return row, val


def _decide(ctx: Context, epoch: int, row: dict[str, Any]) -> list[str]:
    """Step the event rules and early stopping on the epoch's figures; record the unfreeze epochs
    in the row; return the lines that say what was decided."""
    lines = [
        f"epoch {epoch + 1}: {g} unfreezes from epoch {epoch + 2}: its rule fired ({_rule(ctx.spec, g)})"
        for g in ctx.unfreeze.step(epoch, row)
    ]
    row["unfreeze_at"] = ctx.unfreeze.starts
    stop = ctx.early_stop
    if stop.step(epoch, row, waiting=bool(ctx.unfreeze.waiting(epoch))):
        watch = stop.watch
        lines.append(
            f"early stop after epoch {epoch + 1}/{ctx.spec.train.epochs}: {watch.spec.monitor} has not "
            f"improved by more than {watch.spec.min_delta:g} for {watch.spec.patience} epoch(s) (best "
            f"{watch.best:.4f} at epoch {watch.best_epoch + 1}); the best epoch's weights become the "
            "final model"
        )
    return lines


def _rule(spec: Spec, name: str) -> str:
    return str(next(g.unfreeze_rule for g in spec.groups if g.name == name))


def _acc_basis(spec: Spec) -> str:
    if spec.data.multi_label:
        return MULTI_LABEL_ACC
    return DOMINANT if spec.train.mixup is not None else "label"


def best_key(spec: Spec) -> str:
    """The metrics-row key the best epoch is chosen by: the run's headline metric (`layout.headline`)."""
    return layout.headline(spec.data.multi_label)


def _save_epoch(ctx: Context, rundir: RunDir, journey: Journey, row: dict[str, Any]) -> None:
    """metrics.jsonl now; last.pt and (when the epoch is the best so far) best.safetensors in the
    background, from a copy of the state, while the next epoch trains (the previous epoch's
    writes are finished first, so they land in order)."""
    epoch = row["epoch"]
    journey.rows.append(row)
    key = best_key(ctx.spec)
    improved = row[key] > journey.best.get(key, -1.0)
    if improved:
        journey.best = {"epoch": epoch, "val_acc": row["val_acc"], "val_loss": row["val_loss"]}
        if key != "val_acc":
            journey.best[key] = row[key]
    checkpoint = checkpoint_state(ctx, epoch + 1, journey.best, journey.rows)
    ctx.dist.on_main(rundir.writes.wait)

    def write() -> None:
        write_metrics(rundir.folder / layout.METRICS, journey.rows)
        state = snapshot(checkpoint)  # training changes the tensors in place from here on
        meta = {"epoch": str(epoch), key: f"{row[key]:.6f}"}
        keep = ctx.spec.train.keep_epochs
        rundir.writes.submit(lambda: _write_checkpoint(rundir, state, improved, meta, keep, epoch))

    ctx.dist.on_main(write)
    journey.kept = _kept(rundir.checkpoint, epoch + 1, None)


def _write_checkpoint(
    rundir: RunDir, state: dict[str, Any], improved: bool, meta: dict[str, str], keep: int | None, epoch: int
) -> None:
    """In the background: best weights, the kept epoch's weights (`surgery average --swa`: written before
    last.pt names the epoch done), last.pt, then the kept epochs older than the last `keep` dropped."""
    if improved:
        save_safetensors(rundir.folder / layout.BEST, state["model"], meta)
    if keep:
        save_safetensors(rundir.folder / layout.epoch_weights(epoch), state["model"], {"epoch": str(epoch)})
    save_torch(rundir.checkpoint, state)
    if keep:
        _drop_epochs_before(rundir.folder, epoch + 1 - keep)


def _drop_epochs_before(folder: Path, first: int) -> None:
    """Delete the kept epoch weights older than 0-based epoch `first` (any a killed run left too)."""
    for path in layout.kept_epochs(folder):
        if layout.epoch_of(path) < first:
            path.unlink(missing_ok=True)


def _save_interrupted(ctx: Context, rundir: RunDir, journey: Journey, epoch: int, state: EpochState) -> None:
    checkpoint = checkpoint_state(ctx, epoch, journey.best, journey.rows, partial=state)
    ctx.dist.on_main(rundir.writes.wait)
    ctx.dist.on_main(lambda: save_torch(rundir.checkpoint, checkpoint))


def _finish(
    ctx: Context, rundir: RunDir, journey: Journey, wall: float, say: Callable, trackers: Trackers
) -> dict[str, Any]:
    """Evaluate the final model and write model.safetensors, summary.json and the plots."""
    spec = ctx.spec
    stopped = ctx.early_stop.stopped_at is not None
    if ctx.dist.is_main:  # matplotlib loads while the final weights are written
        threading.Thread(target=_load_drawing, daemon=True).start()
    if stopped:
        ctx.dist.on_main(rundir.writes.wait)  # best.safetensors is on disk
        _restore_best(ctx, rundir)
    # the last epoch's validation is the final model's, unless the best epoch's weights came back
    # (or a resume found every epoch trained): then it is evaluated again
    final = journey.last_val if journey.last_val is not None and not stopped else evaluate(ctx)
    _check_ranks(ctx, rundir, spec.train.epochs - 1, journey.kept)
    # stopped early, the final figures are those of the restored best epoch; `final` stays the last row
    summary = {
        **summary_of(ctx, journey.rows, journey.best, final, wall),
        "unfreeze_at": ctx.unfreeze.starts,
        "early_stop": ctx.early_stop.record(journey.best["epoch"]),
        **({"pruned": journey.pruned} if journey.pruned else {}),
    }

    def write() -> None:  # the records, summary.json last of them; then what is drawn from them (final.py)
        save_safetensors(rundir.folder / layout.FINAL, ctx.model.state_dict(), {"spec": spec.name})
        if ctx.ema is not None:
            save_safetensors(rundir.folder / layout.EMA, ctx.ema.module.state_dict(), {"spec": spec.name})
        # the last epoch's checkpoint, written meanwhile, is on disk before summary.json says the
        # run is finished (a failed write stops the run resumable, never finished-looking)
        rundir.writes.wait()
        write_json(rundir.folder / layout.SUMMARY, summary)
        write_drawn_files(rundir.folder, spec, say)

    ctx.dist.on_main(write)
    trackers.finish(summary)
    best = journey.best
    key = best_key(spec)
    what, last = ("val mAP", final.mean_ap) if key == "val_map" else ("val acc", final.acc)
    early = (
        f"stopped early after epoch {ctx.early_stop.stopped_at + 1}, model.safetensors holds epoch "
        f"{(best['epoch'] or 0) + 1}'s weights; "
        if stopped
        else ""
    )
    say(
        f"[green]done[/green] {spec.name}: best {what} {best.get(key, -1.0):.4f} at epoch "
        f"{(best['epoch'] or 0) + 1}, final {last:.4f}; {early}wrote {rundir.folder}",
        soft_wrap=True,
    )
    return summary


def _load_drawing() -> None:
    """Import what the plots are drawn with (about a second), off the critical path."""
    with contextlib.suppress(Exception):  # the drawing itself reports any problem
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401


def _restore_best(ctx: Context, rundir: RunDir) -> None:
    """Put the best epoch's weights (checkpoints/best.safetensors) back into the model, on every
    process; the head-only feature cache is dropped, since the weights it was built on changed."""

    def load() -> None:
        ctx.model.load_state_dict(load_safetensors(rundir.folder / layout.BEST))

    ctx.dist.on_main(load)  # a failure there is raised on every process, none left waiting
    broadcast_state(ctx.model, ctx.dist)
    ctx.features = None


def _check_ranks(ctx: Context, rundir: RunDir, epoch: int, kept: str) -> None:
    """Stop loudly, with ``ranks_consistent: false`` in summary.json, if processes hold different weights."""
    env = ctx.dist
    states = {f"model.{k}": v for k, v in ctx.model.state_dict().items()}
    if ctx.ema is not None:
        states.update({f"ema.{k}": v for k, v in ctx.ema.module.state_dict().items()})
    differ = diverged(states, env)
    if not differ:
        return
    shown = ", ".join(differ[:5]) + (f" ... ({len(differ)} in all)" if len(differ) > 5 else "")
    message = (
        f"the {env.world_size} processes hold different weights after epoch {epoch + 1}: {shown}. "
        "This is a bug in the distributed set-up (please report it); the checkpoint of this epoch "
        f"was not written, {kept}"
    )
    env.on_main(
        lambda: write_json(
            rundir.folder / layout.SUMMARY,
            {
                "name": ctx.spec.name,
                "ranks_consistent": False,
                "world_size": env.world_size,
                "diverged_after_epoch": epoch,
                "diverged_tensors": differ,
                "stopped": message,
            },
        )
    )
    raise TrainingStopped(message) from RanksDiverged(shown)


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
