"""Training: `run` fine-tunes one spec into a run directory.

    context.py     prepare(spec) -> Context: model, data, optimizer, loaders, built once
    loop.py        train_epoch, evaluate, apply_trainable / set_train_mode (freezing)
    features.py    head-only stages on the frozen body's cached outputs
    checkpoint.py  checkpoints/last.pt: state, restore, resume checks (weights-only loads)
    progress.py    bars on a terminal, one line per epoch elsewhere
    summary.py     summary.json
    runner.py      run(): the epoch loop, start to finish
    command.py     `surgery run SPEC...`: several specs, the resume command
    schedule.py, optim.py, runtime.py, autotune.py, checks.py, distributed.py, cache.py, trackers.py, lr_find.py,
    final.py, mixing.py, multilabel.py, progress.py, summary.py: see docs/architecture.md

Importing this package imports no torch: the names below load their module on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# the face's names -> the module that defines them, imported on first use: the package holds pure
# parts too (schedule.py, the spec's loader and the report page use it), which must not import torch
_FACE = {
    "run": "runner",
    "prepare": "context",
    "Context": "context",
    "train_epoch": "loop",
    "evaluate": "loop",
    "apply_trainable": "loop",
    "set_train_mode": "loop",
    "use_feature_cache": "features",
    "checkpoint_state": "checkpoint",
    "restore": "checkpoint",
    "load_checkpoint": "checkpoint",
    "EpochResult": "loop",
    "EpochState": "loop",
    "TrainingStopped": "loop",
    "NonFiniteLoss": "loop",
}


def __getattr__(name: str) -> Any:
    if name in _FACE:
        return getattr(import_module(f".{_FACE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "run",
    "prepare",
    "Context",
    "train_epoch",
    "evaluate",
    "apply_trainable",
    "set_train_mode",
    "use_feature_cache",
    "checkpoint_state",
    "restore",
    "load_checkpoint",
    "EpochResult",
    "EpochState",
    "TrainingStopped",
    "NonFiniteLoss",
]
