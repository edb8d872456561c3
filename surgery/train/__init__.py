"""Training: `run` fine-tunes one spec into a run directory.

    context.py     prepare(spec) -> Context: model, data, optimizer, loaders, built once
    loop.py        train_epoch, evaluate, apply_trainable / set_train_mode (freezing)
    features.py    head-only stages on the frozen body's cached outputs
    checkpoint.py  checkpoints/last.pt: state, restore, resume checks (weights-only loads)
    progress.py    bars on a terminal, one line per epoch elsewhere
    summary.py     summary.json
    runner.py      run(): the epoch loop, start to finish
    command.py     `surgery run SPEC...`: several specs, the resume command
"""
from __future__ import annotations

from .checkpoint import checkpoint_state, load_checkpoint, restore
from .context import Context, prepare
from .features import use_feature_cache
from .loop import (EpochResult, EpochState, NonFiniteLoss, TrainingStopped, apply_trainable, evaluate,
                   set_train_mode, train_epoch)
from .runner import run

__all__ = ["run", "prepare", "Context", "train_epoch", "evaluate", "apply_trainable", "set_train_mode",
           "use_feature_cache", "checkpoint_state", "restore", "load_checkpoint", "EpochResult", "EpochState",
           "TrainingStopped", "NonFiniteLoss"]
