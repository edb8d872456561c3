"""Batch-level augmentation on the device: timm's RandomErasing and Mixup/CutMix.

Both run on normalised batches, after the host-to-device copy, in timm's order (erasing in
the loader's prefetcher, then mixup in the training step). Both draw from Python's `random`,
numpy's global RNG and torch's; here every batch draws from generators seeded by
(seed, epoch, batch, rank) and the caller's RNG states are restored afterwards, so:

- a resumed run mixes and erases exactly what an uninterrupted one did (nothing to checkpoint);
- dropout and the rest of the model's randomness never feel them.

With mixup the targets are soft (one row per image over the classes) and the loss is timm's
`SoftTargetCrossEntropy`; the training accuracy counts the dominant label of each mixed image.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..spec import Spec

DOMINANT = "dominant label"
MULTI_LABEL_ACC = (
    "exact match"  # data.multi_label: an image counts when every class is on the right side of the threshold
)


def _batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    digest = hashlib.blake2b(f"batch/{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class BatchAugment:
    """Erasing and mixup for the training batches of one run; `None` parts are off.

    Call it with a normalised batch on the device: it returns (images, targets), targets soft
    when mixup is on and the labels unchanged otherwise.
    """

    def __init__(self, spec: Spec, num_classes: int, device: torch.device, rank: int = 0) -> None:
        self.seed, self.device, self.rank = spec.seed, device, rank
        self.num_classes = num_classes
        self.erasing = None
        self.mixup = None
        erasing = spec.data.augment.erasing
        if erasing is not None:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(probability=erasing.prob, mode=erasing.mode, device=str(device))
        mixup = spec.train.mixup
        if mixup is not None:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup.mixup_alpha,
                cutmix_alpha=mixup.cutmix_alpha,
                prob=mixup.prob,
                switch_prob=mixup.switch_prob,
                mode="batch",
                label_smoothing=mixup.label_smoothing,
                num_classes=num_classes,
            )

    @property
    def active(self) -> bool:
        return self.erasing is not None or self.mixup is not None

    def reasons(self) -> list[str]:
        """Why batches differ every epoch, for the feature cache's log line."""
        out = []
        if self.erasing is not None:
            out.append("random erasing (data.augment.erasing) changes the images every epoch")
        if self.mixup is not None:
            out.append("mixup/CutMix (train.mixup) mixes different images every epoch")
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return x, y
        with _seeded(_batch_seed(self.seed, epoch, step, self.rank), self.device):
            if self.erasing is not None:
                x = self.erasing(x)
            if self.mixup is not None:
                x, y = self._mix(x, y)
        return x, y

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        even = len(x) - len(x) % 2  # timm mixes a batch with itself reversed; an odd last image stays itself
        target = mixup_target(y, self.num_classes, 1.0, self.mixup.label_smoothing)
        if even:
            mixed = x[:even]  # a view: timm mixes in place
            _, target[:even] = self.mixup(mixed, y[:even])
        return x, target


def train_criterion(spec: Spec, weight: torch.Tensor | None = None) -> nn.Module:
    """The training loss: soft-target cross-entropy with mixup, cross-entropy otherwise
    (label smoothing and class weights as the spec asks); sigmoid + binary cross-entropy with
    ``data.multi_label`` (class weights are then BCE's ``pos_weight``)."""
    if spec.data.multi_label:
        return MultiLabelLoss(spec.train.label_smoothing, weight)
    if spec.train.mixup is not None:
        if weight is not None:
            return WeightedSoftTargetCrossEntropy(weight)
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=spec.train.label_smoothing)


class WeightedSoftTargetCrossEntropy(nn.Module):
    """timm's SoftTargetCrossEntropy with a weight per class: ``sum_c -w_c t_c log p_c``, averaged
    as ``nn.CrossEntropyLoss(weight=w)`` averages (by the summed weight of the targets)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weighted = target * self.weight
        loss = torch.sum(-weighted * torch.log_softmax(x, dim=-1), dim=-1)
        return loss.sum() / weighted.sum()


class MultiLabelLoss(nn.Module):
    """``BCEWithLogitsLoss`` over multi-hot targets, averaged over images and classes. Label
    smoothing as timm's ``BinaryCrossEntropy``: a target 1 becomes ``1 - s + s/K``, a 0 ``s/K``."""

    def __init__(self, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(x.dtype)
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / x.shape[-1]
        return self.bce(x, target)


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """The label training accuracy is counted against: the dominant one of a soft target."""
    return target.argmax(1) if target.ndim == 2 else target
