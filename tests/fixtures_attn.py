"""Tiny user-defined modules for the tests: `surgery` imports them as 'fixtures_attn:Class'."""

from __future__ import annotations

import torch
from torch import nn


class MyAttn(nn.Module):
    """A channel gate built as Module(channels, **kwargs), the timm convention."""

    def __init__(self, channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.channels = channels
        self.scale = scale
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.scale * self.fc(x.mean((2, 3), keepdim=True)))


class _Odd__Name(nn.Conv2d):  # noqa: N801 - underscores are the point: the swapped class must still pickle
    pass


NOT_A_MODULE = 3
