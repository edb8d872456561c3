"""Sources and the dataset over them: images loaded one at a time, each random transform seeded by
(seed, epoch, index) so an epoch is the same whatever ran before it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from .images import UNREADABLE  # noqa: F401 - the one list; datasets.py imports it from here

log = logging.getLogger(__name__)


class ImageSource:
    """A dataset before transforms: `load(i)` gives a PIL image, `targets[i]` its class."""

    classes: list[str]
    targets: np.ndarray
    multi_hot: np.ndarray | None = None  # (N, K) float32 with data.multi_label; `targets` then all 0

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int) -> str:
        return f"item {i}"

    def __len__(self) -> int:
        return len(self.targets)


class ArraySource(ImageSource):
    """Images held in one uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str]) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[i]))


class DatasetSource(ImageSource):
    """A torchvision dataset used without transforms: items are (PIL image, int)."""

    def __init__(self, dataset: Any, targets: np.ndarray, classes: list[str]) -> None:
        self.dataset = dataset
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes

    def load(self, i: int) -> Image.Image:
        image = self.dataset[i][0]
        if isinstance(image, Tensor):
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return image


class FileSource(ImageSource):
    """Image files with class indices (the listing of an ImageFolder, or a CSV's rows).

    `listed_at`: where each file was named, for messages (a CSV file and line, ``labels.csv:12``);
    None when the path says it (an image folder).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: list[str],
        multi_hot: np.ndarray | None = None,
        listed_at: Sequence[str] | None = None,
    ) -> None:
        self.paths = [p for p, _ in samples]
        self.targets = np.asarray([t for _, t in samples], dtype=np.int64)
        self.classes = classes
        self.multi_hot = multi_hot
        self.listed_at = list(listed_at) if listed_at is not None else None

    def load(self, i: int) -> Image.Image:
        from ..files import open_regular

        with open_regular(self.paths[i]) as f:  # a named pipe in place of an image must not hang a worker
            image = Image.open(f)
            return image.convert("RGB")

    def label(self, i: int) -> str:
        return self.paths[i]

    def where(self, i: int) -> str:
        """The file and, when a listing named it, where: ``img/3.png (labels.csv:12)``."""
        return self.paths[i] if self.listed_at is None else f"{self.paths[i]} ({self.listed_at[i]})"


@dataclass
class Pool:
    source: ImageSource
    indices: np.ndarray  # positions in `source`


# --------------------------------------------------------------------------- the dataset
def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _seed_all(seed: int) -> None:
    # timm's crops and RandAugment draw from `random` and numpy, torchvision's from torch;
    # only the CPU generator: torch.manual_seed would also reseed CUDA
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class SplitDataset(Dataset):
    """Transformed items of a source, by position in `indices`, labels relabelled."""

    accepts_epoch = True  # items may be keyed (epoch, index); see make_loader

    def __init__(self, pool: Pool, label_map: np.ndarray, transform: Callable, seed: int, augment: bool) -> None:
        self.source = pool.source
        self.indices = pool.indices
        self.label_map = label_map
        self.transform = transform
        self.seed = seed
        self.augment = augment  # the transform draws random numbers
        self.unreadable = 0  # per process; the build-time scan reports the files known up front
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        """The label of every item, in item order (no image is read)."""
        return self.label_map[self.source.targets[self.indices]]

    @property
    def multi_hot(self) -> np.ndarray | None:
        """With data.multi_label, the (items, classes) 0/1 rows of every item; else None."""
        hot = self.source.multi_hot
        return None if hot is None else hot[self.indices]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int | Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        image, position = self._load(index)
        label: int | Tensor
        if self.source.multi_hot is not None:
            label = torch.from_numpy(self.source.multi_hot[self.indices[position]].copy())
        else:
            label = int(self.label_map[self.source.targets[self.indices[position]]])
        if not self.augment:
            return self.transform(image), label
        if get_worker_info() is not None:  # a worker's RNGs serve nothing but these transforms
            _seed_all(_item_seed(self.seed, epoch, index))
            return self.transform(image), label
        # in the main process (num_workers=0) the model's dropout etc. must not feel the data
        # pipeline: restore the RNGs afterwards (costs ~0.15 ms an item, mostly numpy's state)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            _seed_all(_item_seed(self.seed, epoch, index))
            return self.transform(image), label
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        # an unreadable file must not end a run: use the next readable item instead
        for step in range(len(self)):
            position = (index + step) % len(self)
            i = int(self.indices[position])
            try:
                return self.source.load(i), position
            except UNREADABLE as exc:
                if position not in self._warned:
                    self._warned.add(position)
                    self.unreadable += 1
                    log.warning(
                        "skipping unreadable image %s (%s); %d so far in this process",
                        self.source.label(i),
                        exc,
                        self.unreadable,
                    )
        raise RuntimeError("no image of this dataset can be read")
