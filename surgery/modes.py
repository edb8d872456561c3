"""Running a model in eval mode for a while without losing any module's own train/eval mode.

A frozen group keeps its normalization layers in eval mode inside a model in train mode, so
``model.train()`` afterwards would be wrong: every module's flag is saved and put back instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; each module's own mode restored after it, however it ends."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training
