"""A finished run's final files, and what "finished" means.

A run ends by writing, in this order, its records (model.safetensors, model_ema.safetensors,
summary.json) and then the files drawn from them (plots/curves.png, plots/confusion.png,
report.html). A run is finished when every one of them is in place. A process killed after
summary.json but before its last drawing leaves a run whose training is done and whose records
are complete: `complete_run` draws what is missing from the records instead of training again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..pages.plots import plot_confusion, plot_curves
from ..runs.layout import CLASSES, CONFUSION, CURVES, EMA, FINAL, METRICS, REPORT, SUMMARY
from ..runs.reader import read_metrics
from ..spec import Spec
from .schedule import unfreeze_events


def record_files(spec: Spec) -> list[str]:
    """The files only training writes (model weights, then summary.json, last of them)."""
    return [FINAL, *([EMA] if spec.train.ema else []), SUMMARY]


def drawn_files(summary: Mapping[str, Any]) -> list[str]:
    """The files drawn from the records, in the order they are written (report.html last: it
    shows the others)."""
    return [
        *([CURVES] if summary.get("epochs") else []),
        *([CONFUSION] if summary.get("confusion_matrix") is not None else []),
        REPORT,
    ]


def write_drawn_files(folder: Path, spec: Spec, say: Callable[..., None], only_missing: bool = False) -> list[str]:
    """Draw the plots and report.html of a run whose records are written, from those records
    (summary.json, metrics.jsonl, classes.json); return the files written.

    Args:
        only_missing: leave the files already there alone.
    """
    from rich.markup import escape

    from ..pages.run_page import refresh_report

    folder = Path(folder)
    summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    todo = [name for name in drawn_files(summary) if not (only_missing and (folder / name).is_file())]
    if CURVES in todo:
        rows = read_metrics(folder / METRICS)
        trained = rows[-1]["epoch"] if rows else -1
        starts = summary.get("unfreeze_at")
        events = {e: g for e, g in unfreeze_events(spec, starts).items() if e <= trained}
        plot_curves(folder / CURVES, rows, events)
    if CONFUSION in todo:  # multi-label runs have none; summary.json holds per-class F1
        classes = json.loads((folder / CLASSES).read_text(encoding="utf-8"))
        plot_confusion(folder / CONFUSION, summary["confusion_matrix"], classes)
    if REPORT in todo:
        refresh_report(folder, lambda text: say(f"[yellow]warning[/yellow]: {escape(text)}", soft_wrap=True))
    return [name for name in todo if (folder / name).is_file()]


def complete_run(folder: Path, spec: Spec, say: Callable[..., None]) -> list[str] | None:
    """Finish a run whose training finished but whose drawn files are not all written (its
    process was killed while writing them): draw the missing ones from its records.

    Returns:
        The files written (empty when the run was finished already); None when its training did
        not finish (a record is missing): it must resume from its checkpoint.
    """
    folder = Path(folder)
    if not all((folder / name).is_file() for name in record_files(spec)):
        return None
    return write_drawn_files(folder, spec, say, only_missing=True)


__all__ = ["record_files", "drawn_files", "write_drawn_files", "complete_run"]
