"""Loaders whose epoch E is a pure function of (seed, E): shuffled or class-balanced order, resumable
mid-epoch, sharded across DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochLoader:
    """Batches of one epoch at a time; the content of epoch E depends only on (seed, E).

    Use one epoch's iterator at a time: with worker processes, starting the next epoch ends
    the previous iterator.
    """

    def __init__(self, loader: DataLoader, batches: _EpochBatches) -> None:
        self._loader = loader
        self._batches = batches

    @property
    def dataset(self) -> Dataset:
        return self._loader.dataset

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``(uint8 images NCHW, int64 labels)`` of `epoch` for this rank.

        `start` skips the first batches without loading them (resuming mid-epoch); batch k is
        the same whatever `start` is.
        """
        self._batches.epoch = int(epoch)
        self._batches.start = int(start)
        # the batch list is fixed here, when DataLoader asks the batch sampler for it
        return iter(self._loader)

    def batch_indices(self, epoch: int, start: int = 0) -> list[list[int]]:
        """The dataset indices of each batch of `epoch` (from batch `start`), exactly as `epoch` yields them."""
        self._batches.epoch = int(epoch)
        self._batches.start = int(start)
        return [[index for _, index in batch] for batch in self._batches]

    @property
    def batch_size(self) -> int:
        return self._batches.batch_size

    @property
    def unique_items(self) -> int:
        """How many items of this rank's share are not repeats.

        Without drop_last, DistributedSampler evens the ranks out by repeating a few items; they
        are the last item of some ranks' shares. Count the first `unique_items` only, and the
        ranks together count every item exactly once (exact validation metrics under DDP).
        """
        sampler = self._batches.sampler
        if sampler.drop_last:
            return sampler.num_samples
        return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))

    def state_dict(self) -> dict[str, Any]:
        """The DataLoader generator's state (it draws the worker base seed once per iterator)."""
        return {"generator": self._loader.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loader.generator.set_state(state["generator"])

    def __len__(self) -> int:
        return len(self._batches)


class _IgnoreEpoch(Dataset):
    """Lets make_loader take any map-style dataset: drops the epoch from the key."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key[1]]


class _BalancedSampler(DistributedSampler):
    """DistributedSampler whose epoch is drawn with replacement, every class equally likely.

    Epoch E draws ``len(targets)`` items from a generator seeded with (seed + E), as
    DistributedSampler seeds its permutation; each item's weight is 1 / (its class's count), so
    each class is a 1/K share of the draws on average. The ranks then split that one draw
    exactly as DistributedSampler splits its permutation (padding or dropping the tail), so
    the order is a pure function of (seed, epoch), the same on every rank layout that splits it.
    """

    def __init__(self, targets: np.ndarray, num_replicas: int, rank: int, seed: int, drop_last: bool) -> None:
        super().__init__(
            range(len(targets)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        counts = np.bincount(targets)
        self.weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.float64)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g).tolist()
        if not self.drop_last:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding] if padding > 0 else []
        else:
            indices = indices[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class _EpochBatches:
    """Batch sampler of (epoch, index) keys; the order comes from DistributedSampler(seed, epoch)
    (or, class-balanced, from `_BalancedSampler`)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        balance_targets: np.ndarray | None = None,
    ) -> None:
        if balance_targets is not None:
            self.sampler: DistributedSampler = _BalancedSampler(balance_targets, world_size, rank, seed, drop_last)
        else:
            self.sampler = DistributedSampler(
                range(size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
            )
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # batches of the epoch to skip (resuming mid-epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # built eagerly so the epoch is the one set when the iterator was made
        epoch = self.epoch
        self.sampler.set_epoch(epoch)
        keys = [(epoch, int(i)) for i in self.sampler]
        batches = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return iter(batches[self.start :])

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    balance_targets: np.ndarray | None = None,
) -> EpochLoader:
    """A loader whose epoch E is a pure function of (seed, E), for one DDP rank.

    Args:
        dataset: a `DataBundle` dataset (keyed by (epoch, index)) or any map-style dataset.
        batch_size: images per batch on this rank.
        train: shuffle, in a new order each epoch; False keeps the dataset order. (Random
            transforms belong to the dataset: `DataBundle.train` has them, `.val` not.)
        seed: the run's seed.
        num_workers: worker processes; 0 loads in the main process. Workers persist.
        pin_memory: pin batches for faster copies to an accelerator.
        drop_last: drop the last incomplete batch, and the tail that does not split evenly
            across ranks (otherwise DistributedSampler repeats a few items to even it out).
        rank, world_size: this process's share of every epoch.
        balance_targets: the label of every item: draw each epoch class-balanced (with
            replacement, as many draws as items) instead of shuffling (`data.balance: sampler`).

    Returns:
        An `EpochLoader`: ``for images, labels in loader.epoch(e): ...``.
    """
    if not getattr(dataset, "accepts_epoch", False):
        dataset = _IgnoreEpoch(dataset)
    batches = _EpochBatches(len(dataset), batch_size, train, seed, drop_last, rank, world_size, balance_targets)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": 4}
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # DataLoader draws its worker base seed from this generator each epoch; without it, it
        # would draw from (and advance) the global torch RNG of the training process
        generator=torch.Generator().manual_seed(seed),
        **extra,
    )
    return EpochLoader(loader, batches)


def class_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' class weights, ``n / (K * count[c])``, from the training labels;
    K counts the classes present, and a class without training images weighs 0."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(targets)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=targets)
    return weights


def pos_weights(multi_hot: np.ndarray) -> np.ndarray:
    """`data.balance: loss` with multi-label targets: BCE's ``pos_weight`` of every class,
    ``negatives / positives`` in the training rows (1 for a class without positives)."""
    positives = multi_hot.sum(0)
    negatives = len(multi_hot) - positives
    return np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)


def train_counts(dataset: Any, num_classes: int) -> np.ndarray:
    """Training images of every class: positives per class with multi-label targets."""
    hot = getattr(dataset, "multi_hot", None)
    if hot is not None:
        return hot.sum(0).astype(np.int64)
    return np.bincount(dataset.targets, minlength=num_classes)
