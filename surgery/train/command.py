"""`surgery run SPEC...`: several specs one after another, and the command that resumes them."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Callable, Sequence

from ..errors import RunDirError, SpecError, UserError
from ..spec import Spec, load_spec
from . import runner
from .distributed import teardown, world_from_env
from .loop import TrainingStopped
from .trackers import check_available


def resume_command(paths: Sequence[str], out: str | None, overrides: Sequence[str], device: str | None) -> str:
    """The command line that resumes this `surgery run` (under torchrun, its torchrun line)."""
    _, _, world_size = world_from_env()
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


def run_specs(
    paths: Sequence[str],
    *,
    out: str | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    console=None,
    warn: Callable[[Spec], None] | None = None,
) -> int:
    """Train each spec in turn; a later spec can load an earlier one's weights (run:NAME).

    Every spec is loaded and checked before anything trains. Under torchrun every process runs
    this; errors are printed by rank 0 only and every process returns the same exit code (2 for a
    mistake in what was asked, 1 for a stopped run or an unusable folder).

    Args:
        warn: shows each spec's warnings (rank 0 only).
    """
    from rich.markup import escape

    from ..untrusted import Console

    console = console or Console(highlight=False)
    main = world_from_env()[0] == 0
    hint = resume_command(paths, out, overrides, device)
    try:
        specs = [load_spec(p, overrides) for p in paths]
        for spec in specs:
            check_available(spec)  # a tracker's missing package, before the first spec trains
        if main and warn is not None:
            for spec in specs:
                warn(spec)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SpecError(
                "two specs share a run name",
                found=", ".join(names),
                expected="distinct names",
                hint="set `name:` in the specs",
            )
        for spec in specs:
            out_dir = Path(out) if (out and len(specs) == 1) else Path(out or "runs") / spec.name
            try:
                runner.run(
                    spec,
                    out_dir,
                    device=device,
                    resume=resume,
                    overwrite=overwrite,
                    console=console,
                    runs_root=out_dir.parent,
                    resume_hint=hint,
                )
            except TrainingStopped as exc:
                if main:
                    console.print(
                        f"[bold red]stopped[/bold red] {escape(spec.name)}: {escape(str(exc))}", soft_wrap=True
                    )
                return 1
            except RunDirError as exc:
                if main and exc.exit_code == 1:
                    console.print(
                        f"[bold red]stopped[/bold red] {escape(spec.name)}: {escape(str(exc))}", soft_wrap=True
                    )
                    return 1
                raise
    except UserError as exc:
        if main:
            raise
        return exc.exit_code  # rank 0 says it
    finally:
        teardown()
    return 0
