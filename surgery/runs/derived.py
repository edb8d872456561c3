"""A run made from other runs (`surgery average`): written like any run, so that `report`,
`evaluate`, `predict`, `export` and `compare` use it unchanged, and saying where it came from.

It holds the spec of the run it was made from (renamed), that run's load report, classes and splits
(the test split `evaluate` rebuilds is that run's), its own model.safetensors and summary.json, and
under summary.json's `DERIVED` key the record of how it was made (method, sources, choices).
It has no metrics.jsonl and no checkpoints: it was never trained.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import Origin, UsageError
from ..files import atomic_write_bytes, write_json, write_text
from .layout import CLASSES, FINAL, LOAD_REPORT, SPEC, SPLITS, SUMMARY
from .reader import Run
from .writer import RunDir, save_safetensors

if TYPE_CHECKING:
    import torch

DERIVED = "averaged"  # summary.json's key: how the run was made from others
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_new(out: str | Path, flag: str = "--out") -> Path:
    """A derived run goes to a folder that does not exist yet (never over a run).

    Raises:
        UsageError: `out` exists, located at `flag`.
    """
    path = Path(out)
    if path.exists() or path.is_symlink():
        raise UsageError(
            f"{path} exists",
            origin=Origin.flag(flag, str(out)),
            found=f"a {'folder' if path.is_dir() else 'file'} at {path}",
            expected="a path that does not exist yet: the new run directory",
            hint="choose another --out, or delete the old folder first",
        )
    return path


def renamed_spec(base: Run, name: str) -> str:
    """The base run's spec.yaml with `name` set to the new run's (kept when not a valid name)."""
    import yaml

    raw = base.raw_spec
    if not isinstance(raw, dict) or not _NAME.match(name):
        return base.file(SPEC).read_text(encoding="utf-8")
    return yaml.safe_dump({**raw, "name": name}, sort_keys=False, allow_unicode=True)


def write_derived(
    out: str | Path,
    base: Run,
    state: Mapping[str, torch.Tensor],
    summary: Mapping[str, Any],
    draw: Callable[[Path], Any],
) -> Path:
    """Write a derived run into `out` (which must not exist): staged, then swapped into place.

    Args:
        base: the run whose spec, load report, classes and splits it keeps.
        state: the weights (model.safetensors).
        summary: summary.json, its `DERIVED` record included.
        draw: writes the drawn files (plots, report.html) into the staging folder it is given.
    """
    path = check_new(out)
    rundir = RunDir(path)
    rundir.claim(resume=False, overwrite=False)
    try:
        folder = rundir.folder
        write_text(folder / SPEC, renamed_spec(base, path.name))
        for name in (LOAD_REPORT, CLASSES, SPLITS):
            if base.has(name):
                atomic_write_bytes(folder / name, base.file(name).read_bytes())
        method = str((summary.get(DERIVED) or {}).get("method", "average"))
        save_safetensors(folder / FINAL, state, {"spec": path.name, DERIVED: method})
        write_json(folder / SUMMARY, dict(summary))
        draw(folder)
        rundir.start()
    finally:
        rundir.release()
    return path


__all__ = ["DERIVED", "check_new", "renamed_spec", "write_derived"]
