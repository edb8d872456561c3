"""`surgery sweep`: every variant of a sweep file trained as an ordinary run directory, with an
Optuna study deciding which worker trains which variant.

    file.py      the sweep file: `load_sweep` (its JSON Schema, then the rules between fields),
                 `Sweep` and its variants
    study.py     the storage (SQLite by default) and the study, created and filled once; the pruner
    worker.py    one worker's loop (take a trial, train its variant, report) and the N processes
    command.py   `surgery sweep`: check every variant, open the study, work, write sweep.json, compare

Importing this package imports neither torch nor Optuna.
"""

from __future__ import annotations

from .command import check_variants, sweep_command, trial_lines, write_comparison, write_sweep_json
from .file import (
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    Axis,
    Prune,
    Range,
    Sweep,
    Variant,
    fingerprint,
    is_sweep_file,
    load_sweep,
)
from .study import LOCK_TIMEOUT, default_storage, make_pruner, open_storage, open_study, shown_url
from .worker import Worker, run_trial, spawn, storage_failed, variant_attrs, work

__all__ = [
    "sweep_command",
    "check_variants",
    "write_sweep_json",
    "write_comparison",
    "trial_lines",
    "load_sweep",
    "is_sweep_file",
    "fingerprint",
    "Sweep",
    "Axis",
    "Range",
    "Variant",
    "Prune",
    "OBJECTIVES",
    "SAMPLERS",
    "PRUNERS",
    "LOCK_TIMEOUT",
    "default_storage",
    "open_storage",
    "open_study",
    "make_pruner",
    "shown_url",
    "Worker",
    "work",
    "run_trial",
    "spawn",
    "storage_failed",
    "variant_attrs",
]
