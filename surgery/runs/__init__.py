"""A trained run: its files' names (`layout`), one reader every command shares (`open_run`, `Run`,
`Run.load`) and the writer `surgery run` fills it with (`RunDir`).

    layout.py   the run directory's file names and its headline metric, defined once
    reader.py   open_run(path) -> Run: spec, classes, splits, summary, metrics, weights; tolerant views
                for the report, `require_*` for commands that need a file
    loaded.py   Run.load(device, weights) -> LoadedRun: the model, strictly its own weights (imports torch)
    writer.py   RunDir: claim, stage, swap in, lock; safetensors and metrics.jsonl writers
"""

from __future__ import annotations

from . import layout
from .reader import Run, Unreadable, open_run, read_json, read_metrics
from .writer import RunDir, RunLock, load_safetensors, save_safetensors, save_torch, write_metrics

__all__ = [
    "layout",
    "Run",
    "RunDir",
    "RunLock",
    "Unreadable",
    "open_run",
    "read_json",
    "read_metrics",
    "load_safetensors",
    "save_safetensors",
    "save_torch",
    "write_metrics",
]
