"""Running a model in train or eval mode for a while without losing any module's own mode.

A frozen group keeps its normalization layers in eval mode inside a model in train mode, so
``model.train()`` afterwards would be wrong: every module's flag is saved and put back instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def in_mode(model: nn.Module, *, train: bool) -> Iterator[nn.Module]:
    """``model.train(train)`` inside the block; each module's own mode restored after it, however it ends."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        yield model
    finally:
        for module, training in modes:
            module.training = training


def evaluating(model: nn.Module):
    """Eval mode inside the block (no running statistics move, no dropout); see `in_mode`."""
    return in_mode(model, train=False)
