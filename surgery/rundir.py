"""Moved: the run directory's writer is `surgery.runs.writer`, its file layer `surgery.files`.
Kept so that imports of `surgery.rundir` from before the move go on working."""
from __future__ import annotations

from .files import atomic_write_bytes, check_writable, remove_temporaries, write_json, write_text  # noqa: F401
from .runs.reader import read_metrics  # noqa: F401
from .runs.writer import RunDir, _Lock, load_safetensors, save_safetensors, save_torch, write_metrics  # noqa: F401
