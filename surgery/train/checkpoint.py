"""`checkpoints/last.pt`: what it holds, how a run is restored from it, and when it may resume.

    {
      format, epoch, batch  where to continue: batch > 0 means mid-epoch (after Ctrl-C)
      model, optimizer, scaler, plateau, ema, loaders (their generators)
      unfreeze              event rules: the epoch each fired plateau rule unfroze its group, and
                            every watch (best value, epochs without improvement)
      early_stop            its watch, and the epoch it stopped after (a stopped run resumed only
                            writes its final files)
      ranks: [per process: rng (python, numpy, torch, cuda), partial-epoch sums, and under DDP
              the BatchNorm statistics, which move per process until the epoch ends]
      best, rows            the best epoch so far and every metrics row (metrics.jsonl is rewritten
                            from them, so a resumed run lists each epoch exactly once)
      world_size, spec      what the run was started with
    }

Everything in it is tensors and plain data, and it is read with ``torch.load(weights_only=True)``:
run directories get shared, and a pickle that can construct arbitrary objects can run code.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import Origin, RunDirError, describe_exception, format_path
from ..spec import Spec
from ..spec.schema import fill_defaults
from .context import Context
from .loop import EpochState
from .runtime import rng_state, set_rng_state

CHECKPOINT_FORMAT = 3  # 3: RNG states as tensors and plain data (2: numpy arrays; 1: one process)


def _rank_state(ctx: Context, partial: EpochState | None) -> dict[str, Any]:
    state: dict[str, Any] = {"rng": rng_state(), "partial": asdict(partial) if partial is not None else None}
    if ctx.dist.enabled:  # BatchNorm statistics differ between processes until the epoch ends
        state["buffers"] = {f"model.{n}": b.detach().cpu().clone() for n, b in ctx.model.named_buffers()}
        if ctx.ema is not None:
            state["buffers"].update({f"ema.{n}": b.detach().cpu().clone() for n, b in ctx.ema.module.named_buffers()})
    return state


def checkpoint_state(
    ctx: Context,
    epoch: int,
    best: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] = (),
    *,
    partial: EpochState | None = None,
) -> dict[str, Any] | None:
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
        "unfreeze": ctx.unfreeze.state_dict(),
        "early_stop": ctx.early_stop.state_dict(),
        "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
        "loaders": {"train": ctx.train_loader.state_dict(), "val": ctx.val_loader.state_dict()},
        "ranks": ranks,
        "world_size": ctx.dist.world_size,
        "best": dict(best),
        "rows": [dict(r) for r in rows],
        "spec": json.loads(json.dumps(ctx.spec.raw)),
        "spec_resolved": ctx.spec.resolved_raw(),  # what spec.yaml holds: a resume from it is the same spec
    }


def _restore_buffers(ctx: Context, saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        own = {f"model.{n}": b for n, b in ctx.model.named_buffers()}
        if ctx.ema is not None:
            own.update({f"ema.{n}": b for n, b in ctx.ema.module.named_buffers()})
        for name, value in saved.items():
            own[name].copy_(value)


def restore(ctx: Context, state: Mapping[str, Any]) -> EpochState | None:
    """Load a checkpoint into `ctx`; return the partial epoch to continue, if it stopped mid-epoch."""
    ctx.model.load_state_dict(state["model"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scaler.load_state_dict(state["scaler"])
    ctx.plateau.load_state_dict(state["plateau"])
    if "unfreeze" in state:  # checkpoints from before event rules have neither (nor rules in their spec)
        ctx.unfreeze.load_state_dict(state["unfreeze"])
        ctx.early_stop.load_state_dict(state["early_stop"])
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
        _restore_buffers(ctx, mine["buffers"])
    if state.get("batch", 0) == 0 or mine["partial"] is None:
        return None
    return EpochState(**mine["partial"])


def _numpy_globals() -> list[Any]:
    """What a format-2 checkpoint's numpy RNG state needs: plain arrays, never arbitrary objects."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read `last.pt` with ``weights_only=True``: tensors and plain data, never code.

    Raises:
        RunDirError: unreadable, or holding objects a weights-only load refuses (a pickle that
            would construct them could run code, so it is not opened).
    """
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same problem for the user
        unsafe = "weights only load failed" in str(exc).lower() or "unsupported global" in str(exc).lower()
        problem = (
            f"cannot resume: {path} holds Python objects besides tensors and plain data, and surgery does "
            "not unpickle those (a pickle can run code)"
            if unsafe
            else f"cannot resume: {path} is unreadable ({describe_exception(exc, 120)})"
        )
        raise RunDirError(
            problem,
            origin=Origin.path(path),
            expected="a checkpoint written by `surgery run`",
            hint="start afresh with --overwrite, or resume from a run directory you trust",
        ) from None
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise RunDirError(
            f"cannot resume: {path} is not a checkpoint of `surgery run`",
            origin=Origin.path(path),
            found=type(state).__name__,
            expected="a checkpoint written by `surgery run`",
            hint="start afresh with --overwrite",
        )
    return state


def first_difference(a: Any, b: Any, path: tuple = ()) -> tuple:
    """The key path where two plain-data trees first differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), path + (key,))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, path + (i,))
    return path


def check_resumable(state: Mapping[str, Any], spec: Spec, path: Path, run_dir: Path, world_size: int) -> str | None:
    """Refuse a resume with another spec or, mid-epoch, another number of processes; return a note
    when only the data order changes (another number of processes at an epoch boundary)."""
    # both sides with every default filled in: loading drops insert's defaults (position, init, args)
    # from the entries of other operations (remove, lora), and the stored spec gets them back here
    mine = fill_defaults(json.loads(json.dumps(spec.raw)))
    theirs = state.get("spec")
    if isinstance(theirs, dict):  # a key added to the schema since the run started takes its default there too
        theirs = fill_defaults(theirs)
    resolved = state.get("spec_resolved")
    if isinstance(resolved, dict):
        resolved = fill_defaults(resolved)
    # the spec as written (the same file again) or as spec.yaml keeps it (paths made absolute)
    if theirs != mine and (resolved is None or resolved != fill_defaults(spec.resolved_raw())):
        where = format_path(first_difference(theirs, mine))
        raise RunDirError(
            f"cannot resume: the spec differs from the one this run started with (at {where})",
            origin=Origin.path(path),
            expected=f"the spec in {run_dir / 'spec.yaml'}",
            exit_code=2,
            hint="resume with the same spec file and --set options, or start a new run",
        )
    started_with = int(state.get("world_size", 1))
    if started_with != world_size and state.get("batch", 0):
        raise RunDirError(
            f"cannot resume: this run stopped mid-epoch with {started_with} processes, "
            f"and {world_size} are running now",
            origin=Origin.path(path),
            expected=f"{started_with} processes (torchrun --nproc_per_node ...)",
            exit_code=2,
            hint="resume with the same number of processes",
        )
    if started_with != world_size:
        return (
            f"this run started with {started_with} processes and resumes with {world_size}: "
            "the data order changes from here on"
        )
    return None
