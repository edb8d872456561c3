"""Datasets, transforms and loaders for the `data` section of a spec.

Every dataset becomes a *source* (images loaded one at a time, integer targets, class
names) and index arrays into it. The train/val split, `data.classes` and `data.subset` only
ever shrink those index arrays, so nothing is decoded until a batch asks for it.

Transforms end in uint8 tensors: normalisation runs on the device (`normalize`), so the
host-to-device copy is a quarter of the float size.

Randomness: an item is requested as ``(epoch, index)`` and its random transform runs with
Python, numpy and torch RNGs seeded from a hash of (seed, epoch, index). Data order comes from
a `DistributedSampler` seeded with (seed, epoch). So epoch E sees the same batches whatever
ran before it in the process, however many workers load it, and on every DDP rank layout
that splits the same order: a run resumed at epoch 5 matches an uninterrupted one.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import logging
import math
import random
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from .backbones import IMAGENET_MEAN, IMAGENET_STD
from .errors import SpecError, did_you_mean
from .spec import Spec

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FAKE_SIZES = {"train": 256, "val": 64}
# ImageNet's 0.08 lower bound assumes large photos and long schedules; fine-tuning sets are
# small, runs are short and images often tiny (8% of an 8x8 digit is two pixels).
STANDARD_SCALE = (0.25, 1.0)
_VAL_DIRS = ("val", "validation", "valid", "test")
# classification datasets of torchvision known to load through `_torchvision` (others may too)
_TORCHVISION_SHOWN = ("cifar10", "cifar100", "mnist", "fashionmnist", "kmnist", "qmnist", "svhn", "stl10",
                      "usps", "semeion", "flowers102", "food101", "dtd", "oxfordiiitpet", "stanfordcars",
                      "fgvcaircraft", "gtsrb", "country211", "eurosat", "pcam", "caltech101", "sun397",
                      "imagenette", "fer2013", "imagenet")
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- public types
@dataclass
class DataBundle:
    """Train and val datasets for a spec, ready for `make_loader`.

    Items of `train` and `val` are ``(uint8 tensor 3xHxW, int label in 0..K-1)``; they may be
    indexed by ``index`` or by ``(epoch, index)`` (the key `make_loader` uses).
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, ...]  # one per input channel
    std: tuple[float, ...]
    deterministic_train: bool
    describe: str
    test: Dataset | None = None  # a held-out test set (imagefolder test/, csv split=test), eval transform


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


# --------------------------------------------------------------------------- sources
class _Source:
    """A dataset before transforms: `load(i)` gives a PIL image, `targets[i]` its class."""

    classes: list[str]
    targets: np.ndarray

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int) -> str:
        return f"item {i}"

    def __len__(self) -> int:
        return len(self.targets)


class _ArraySource(_Source):
    """Images held in one uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str]) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[i]))


class _DatasetSource(_Source):
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


class _FileSource(_Source):
    """Image files with class indices (the listing of an ImageFolder)."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: list[str]) -> None:
        self.paths = [p for p, _ in samples]
        self.targets = np.asarray([t for _, t in samples], dtype=np.int64)
        self.classes = classes

    def load(self, i: int) -> Image.Image:
        with open(self.paths[i], "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")

    def label(self, i: int) -> str:
        return self.paths[i]


@dataclass
class _Pool:
    source: _Source
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


class _Split(Dataset):
    """Transformed items of a source, by position in `indices`, labels relabelled."""

    accepts_epoch = True  # items may be keyed (epoch, index); see make_loader

    def __init__(self, pool: _Pool, label_map: np.ndarray, transform: Callable, seed: int, augment: bool) -> None:
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        image, position = self._load(index)
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
            except _UNREADABLE as exc:
                if position not in self._warned:
                    self._warned.add(position)
                    self.unreadable += 1
                    log.warning("skipping unreadable image %s (%s); %d so far in this process",
                                self.source.label(i), exc, self.unreadable)
        raise RuntimeError("no image of this dataset can be read")


class _IgnoreEpoch(Dataset):
    """Lets make_loader take any map-style dataset: drops the epoch from the key."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key[1]]


# --------------------------------------------------------------------------- transforms
def _interpolation(data_config: Mapping) -> str:
    mode = data_config.get("interpolation") or "bilinear"
    return "bilinear" if mode == "random" else mode


class _EvalGeometry:
    """PIL image -> RGB PIL image of image_size x image_size, the way inference sees it.

    Images whose shorter side is no larger than the input (8x8 digits, 28px MNIST, 32px
    CIFAR) are resized whole: for them crop_pct, an ImageNet convention for large photos of a
    centred object, would only cut off real content. Larger images follow the config: resize
    to image_size/crop_pct and crop (crop_mode center, squash or border, as timm does).
    """

    def __init__(self, data_config: Mapping, image_size: int) -> None:
        from timm.data.transforms import MaybePILToTensor, str_to_pil_interp
        from timm.data.transforms_factory import transforms_imagenet_eval

        self.size = image_size
        self.resample = str_to_pil_interp(_interpolation(data_config))
        timm_eval = transforms_imagenet_eval(
            image_size,
            crop_pct=data_config.get("crop_pct"),
            crop_mode=data_config.get("crop_mode"),
            interpolation=_interpolation(data_config),
            mean=tuple(data_config.get("mean", IMAGENET_MEAN)),
            std=tuple(data_config.get("std", IMAGENET_STD)),
            use_prefetcher=True,  # stops at a uint8 tensor, which we add ourselves
        )
        self.large = [t for t in timm_eval.transforms if not isinstance(t, MaybePILToTensor)]
        self.mode = image_mode(data_config)

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert(self.mode)
        if min(image.size) <= self.size:
            return image.resize((self.size, self.size), self.resample)
        for step in self.large:
            image = step(image)
        return image


class _Compose:
    """A picklable chain of PIL steps ending in a uint8 CHW tensor."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Image.Image) -> Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        for step in self.steps:
            image = step(image)
        return pil_to_tensor(image)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(s) for s in self.steps) + ")"


def image_mode(data_config: Mapping) -> str:
    """'L' for a model that reads one channel (model.in_chans: 1), else 'RGB'. A gray image stays
    exactly itself: PIL's RGB -> L of (v, v, v) is v."""
    return "L" if tuple(data_config.get("input_size", (3,)))[0] == 1 else "RGB"


class _ToRGB:
    """To the model's image mode: RGB, or L for one input channel."""

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert(self.mode)


def eval_transform(data_config: Mapping, image_size: int) -> Callable[[Image.Image], Tensor]:
    """The deterministic transform for validation and prediction.

    Args:
        data_config: a timm-style data config (`interpolation`, `crop_pct`, `crop_mode`, ...).
        image_size: the side of the square model input.

    Returns:
        A callable PIL image -> uint8 tensor 3 x image_size x image_size. Gray and RGBA
        images become RGB. Images whose shorter side is at most `image_size` are resized
        whole; larger ones are resized to ``image_size / crop_pct`` and cropped per
        `crop_mode`, as timm evaluates.

    Example:
        >>> t = eval_transform({"crop_pct": 0.875, "interpolation": "bilinear"}, 32)
        >>> t(Image.new("L", (100, 80))).shape
        torch.Size([3, 32, 32])
    """
    return _Compose([_EvalGeometry(data_config, image_size)])


def _train_transform(spec: Spec, data_config: Mapping) -> tuple[Callable[[Image.Image], Tensor], bool]:
    """The train transform for `data.augment`, and whether it is deterministic."""
    import torchvision.transforms as T
    from timm.data.transforms import RandomResizedCropAndInterpolation

    size = spec.data.image_size
    augment = spec.data.augment
    where = ("data", "augment")
    if augment.preset == "none":
        return eval_transform(data_config, size), True
    if augment.scale is not None and augment.crop_given and not augment.crop:
        raise spec.error(where + ("scale",), "scale sets the range of the random crop, which is off",
                         found=f"crop: false, scale: {list(augment.scale)}",
                         expected="crop: true (or leave crop out) with scale, or no scale",
                         hint="remove `crop: false` to crop randomly")
    scale = augment.scale if augment.scale is not None else STANDARD_SCALE
    if scale[0] > scale[1]:
        raise spec.error(where + ("scale",), "scale is a [min, max] range of the crop area",
                         found=str(list(scale)), expected="min <= max, e.g. [0.25, 1.0]")
    interpolation = _interpolation(data_config)
    steps: list[Callable] = [_ToRGB(image_mode(data_config))]
    if augment.crop:
        steps.append(RandomResizedCropAndInterpolation(size, scale=scale, interpolation=interpolation))
    else:
        steps.append(_EvalGeometry(data_config, size))
    if augment.hflip > 0:
        steps.append(T.RandomHorizontalFlip(augment.hflip))
    if augment.vflip > 0:
        steps.append(T.RandomVerticalFlip(augment.vflip))
    if augment.rotation > 0:
        steps.append(T.RandomRotation(augment.rotation))
    if augment.randaugment:
        steps.append(_randaugment(spec, augment.randaugment, size, data_config))
    if augment.color_jitter > 0:
        steps.append(T.ColorJitter(*(augment.color_jitter,) * 3))
    deterministic = len(steps) == 2 and isinstance(steps[1], _EvalGeometry)
    return _Compose(steps), deterministic


def _randaugment(spec: Spec, text: str, size: int, data_config: Mapping) -> Callable:
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    mean = data_config.get("mean", IMAGENET_MEAN)
    hparams = {"translate_const": int(size * 0.45),
               "img_mean": tuple(min(255, round(255 * m)) for m in mean),
               "interpolation": str_to_pil_interp(_interpolation(data_config))}
    error = spec.error(("data", "augment", "randaugment"), "this is not a RandAugment config string",
                       found=repr(text), expected="'rand' followed by -m<magnitude>, -n<layers>, -mstd<std>, "
                       "-p<prob>, -inc<0|1>, e.g. 'rand-m9-mstd0.5'")
    head, *sections = text.split("-")
    # timm skips a section it cannot read (no digits) without a word: refuse it here instead
    if head != "rand" or not all(re.fullmatch(r"(mstd|mmax|inc|m|n|p)[0-9]+(\.[0-9]+)?|t\w+", s) for s in sections):
        raise error
    try:
        return rand_augment_transform(text, hparams)
    except (AssertionError, ValueError, KeyError, IndexError):
        raise error from None


def normalize(batch: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images NCHW -> float32 ``(x / 255 - mean) / std``, on the batch's device.

    The memory format is kept (a channels_last batch stays channels_last).

    Example:
        >>> x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
        >>> normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).unique().tolist()
        [1.0]
    """
    scale, shift = _affine(tuple(float(m) for m in mean), tuple(float(s) for s in std), batch.device)
    # .float() and the in-place ops both preserve the memory format
    return batch.float().mul_(scale).sub_(shift)


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # cached: building them per batch would copy from pageable host memory and sync the stream
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


# --------------------------------------------------------------------------- loaders
class _BalancedSampler(DistributedSampler):
    """DistributedSampler whose epoch is drawn with replacement, every class equally likely.

    Epoch E draws ``len(targets)`` items from a generator seeded with (seed + E), as
    DistributedSampler seeds its permutation; each item's weight is 1 / (its class's count), so
    each class is a 1/K share of the draws on average. The ranks then split that one draw
    exactly as DistributedSampler splits its permutation (padding or dropping the tail), so
    the order is a pure function of (seed, epoch), the same on every rank layout that splits it.
    """

    def __init__(self, targets: np.ndarray, num_replicas: int, rank: int, seed: int, drop_last: bool) -> None:
        super().__init__(range(len(targets)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
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
        return iter(indices[self.rank: self.total_size: self.num_replicas])


class _EpochBatches:
    """Batch sampler of (epoch, index) keys; the order comes from DistributedSampler(seed, epoch)
    (or, class-balanced, from `_BalancedSampler`)."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 rank: int, world_size: int, balance_targets: np.ndarray | None = None) -> None:
        if balance_targets is not None:
            self.sampler: DistributedSampler = _BalancedSampler(balance_targets, world_size, rank, seed, drop_last)
        else:
            self.sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank,
                                              shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # batches of the epoch to skip (resuming mid-epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # built eagerly so the epoch is the one set when the iterator was made
        epoch = self.epoch
        self.sampler.set_epoch(epoch)
        keys = [(epoch, int(i)) for i in self.sampler]
        batches = [keys[i: i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return iter(batches[self.start:])

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


# --------------------------------------------------------------------------- splits
def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _stratified(targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a random sample of `n` of `targets`, each class in proportion."""
    if n >= len(targets):
        return np.arange(len(targets))
    labels, counts = np.unique(targets, return_counts=True)
    exact = counts * n / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    # largest remainders get the places left over, ties to the lower class
    for j in np.argsort(-(exact - quota), kind="stable")[: n - int(quota.sum())]:
        quota[j] += 1
    quota = np.minimum(quota, counts)
    picked = [rng.permutation(np.flatnonzero(targets == label))[:q] for label, q in zip(labels, quota)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _split(spec: Spec, source: _Source, indices: np.ndarray | None = None) -> tuple[_Pool, _Pool]:
    """Hold out `val_split` of a pool, stratified and seeded; fixed before any class filtering,
    so an image stays on its side whatever `data.classes` and `data.subset` say."""
    indices = np.arange(len(source)) if indices is None else indices
    n_val = math.ceil(spec.data.val_split * len(indices))  # as scikit-learn rounds test_size
    val_pos = _stratified(source.targets[indices], n_val, _rng(spec.seed, 0))
    is_val = np.zeros(len(indices), dtype=bool)
    is_val[val_pos] = True
    if n_val >= len(indices):
        raise spec.error(("data", "val_split"), "val_split leaves no images to train on",
                         found=f"{spec.data.val_split} of {len(indices)} images", expected="a smaller fraction")
    return _Pool(source, indices[~is_val]), _Pool(source, indices[is_val])


# --------------------------------------------------------------------------- datasets
def _digits(spec: Spec) -> tuple[_Pool, _Pool, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    source = _ArraySource(images, digits.target, [str(c) for c in digits.target_names])
    return (*_split(spec, source), 0)


def _fake(spec: Spec) -> tuple[_Pool, _Pool, int]:
    from torchvision.datasets import FakeData

    size = spec.data.image_size
    num_classes = spec.model.num_classes or 10
    n_train = spec.data.subset.train or FAKE_SIZES["train"]
    n_val = spec.data.subset.val or FAKE_SIZES["val"]
    offset = spec.seed * 1_000_003  # FakeData seeds item i with i + offset: disjoint train and val
    pools = []
    for n, start in ((n_train, offset), (n_val, offset + n_train)):
        dataset = FakeData(n, (3, size, size), num_classes, random_offset=start)
        targets = np.array([dataset[i][1] for i in range(n)])
        pools.append(_Pool(_DatasetSource(dataset, targets, [f"class{i}" for i in range(num_classes)]),
                           np.arange(n)))
    return pools[0], pools[1], 0


def _folder_error(spec: Spec, problem: str, folder: Path, **kw: Any) -> SpecError:
    return spec.error(("data", "root"), problem, found=str(folder), **kw)


def _scan(paths: Sequence[str]) -> list[bool]:
    """Which files PIL can identify (header only; a truncated body is caught when loaded)."""
    def ok(path: str) -> bool:
        try:
            with Image.open(path) as image:
                return image.size[0] > 0 and image.size[1] > 0
        except _UNREADABLE:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(ok, paths, chunksize=64))


CSV_SPLITS = ("train", "val", "test")


def _csv(spec: Spec) -> tuple[_Pool, _Pool, int, _Pool | None]:
    """A CSV file with a header: `path` (relative to the CSV's folder), `label` (a class name) and
    optionally `split` (train, val or test; without it, or without val rows, val_split holds out
    part of train). Classes are the label names, sorted, as ImageFolder sorts its folders."""
    import csv

    if spec.data.root is None:
        raise spec.error(("data", "root"), "csv needs the CSV file", found="root: null",
                         expected="data.root set to a CSV file with the columns path,label[,split]")
    path = spec.resolve_path(spec.data.root, ("data", "root"))
    if not path.is_file():
        raise _folder_error(spec, f"the CSV file {path} does not exist" if not path.exists() else f"{path} is not a file",
                            path, expected="a CSV file with a header line path,label[,split]",
                            hint="data.root is relative to the spec file's folder")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise _folder_error(spec, f"the CSV file {path} has no column {' or '.join(missing)}", path,
                                    expected="a header line with path and label (and optionally split)",
                                    hint=f"its header is: {','.join(header) or '(empty)'}")
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _folder_error(spec, f"cannot read the CSV file {path}: {exc}", path,
                            expected="UTF-8 text, comma-separated, with a header line") from None
    samples: dict[str, list[tuple[str, str]]] = {s: [] for s in CSV_SPLITS}
    for line, row in rows:
        file, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        split = (row.get("split") or "train").strip() if "split" in header else "train"
        if not file or not label:
            raise _folder_error(spec, f"{path}, line {line}: an empty {'path' if not file else 'label'}", path,
                                expected="a path and a label on every line")
        if split not in samples:
            raise _folder_error(spec, f"{path}, line {line}: unknown split {split!r}", path,
                                expected="train, val or test", hint=did_you_mean(split, list(CSV_SPLITS)))
        samples[split].append((str((path.parent / file)), label))
    if not samples["train"]:
        raise _folder_error(spec, f"the CSV file {path} has no training rows", path,
                            expected="rows with split train (or no split column)")
    classes = sorted({label for rows_ in samples.values() for _, label in rows_})
    index = {c: i for i, c in enumerate(classes)}
    every = [s for split in CSV_SPLITS for s in samples[split]]
    readable = _scan([p for p, _ in every])
    bad = {p for (p, _), ok in zip(every, readable) if not ok}
    if bad:
        log.warning("skipping %d unreadable or missing image file(s) listed in %s, e.g. %s", len(bad), path,
                    ", ".join(sorted(bad)[:3]))
    kept = {split: [(p, index[c]) for p, c in samples[split] if p not in bad] for split in CSV_SPLITS}
    source = _FileSource(kept["train"] + kept["val"] + kept["test"], classes)
    n_train, n_val = len(kept["train"]), len(kept["val"])
    present = set(source.targets[:n_train].tolist())
    empty = [c for c in classes if index[c] not in present]
    if empty:
        raise _folder_error(spec, f"some labels of {path} have no readable training image: " + ", ".join(empty), path,
                            expected="at least one training image per label")
    test = _Pool(source, np.arange(n_train + n_val, len(source))) if kept["test"] else None
    if n_val == 0:
        train, val = _split(spec, source, np.arange(n_train))
    else:
        train, val = _Pool(source, np.arange(n_train)), _Pool(source, np.arange(n_train, n_train + n_val))
    return train, val, len(bad), test


def _imagefolder(spec: Spec) -> tuple[_Pool, _Pool, int, _Pool | None]:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    layout = "root/<class>/<image> or root/train/<class>/<image> with root/val/<class>/<image>"
    if spec.data.root is None:
        raise spec.error(("data", "root"), "imagefolder needs a folder", found="root: null",
                         expected=f"data.root set to a folder laid out as {layout}")
    root = spec.resolve_path(spec.data.root, ("data", "root"))
    if not root.is_dir():
        raise _folder_error(spec, f"the dataset folder {root} does not exist" if not root.exists()
                            else f"{root} is not a folder", root, expected=f"a folder laid out as {layout}",
                            hint="data.root is relative to the spec file's folder")
    val_dir = next((root / d for d in _VAL_DIRS if (root / d).is_dir()), None)
    # test/ is the validation set when there is no val/ (as before); beside val/ it is a test set
    test_dir = root / "test" if val_dir is not None and val_dir.name != "test" and (root / "test").is_dir() else None
    train_dir = root / "train" if (root / "train").is_dir() and val_dir is not None else root
    try:
        folder = ImageFolder(str(train_dir), allow_empty=True)
    except FileNotFoundError:
        raise _folder_error(spec, f"the dataset folder {train_dir} has no class folders", train_dir,
                            expected=f"one sub-folder per class with images inside: {layout}") from None
    samples = list(folder.samples)
    val_samples: list[tuple[str, int]] = []
    if train_dir != root:
        extra = sorted(d.name for d in val_dir.iterdir() if d.is_dir() and d.name not in folder.class_to_idx)
        if extra:
            raise _folder_error(spec, f"{val_dir} has class folders that {train_dir} lacks: {', '.join(extra)}",
                                val_dir, expected="the same class folders under train/ and val/")
        val_samples = make_dataset(str(val_dir), folder.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    test_samples: list[tuple[str, int]] = []
    if train_dir != root and test_dir is not None:
        extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in folder.class_to_idx)
        if extra:
            raise _folder_error(spec, f"{test_dir} has class folders that {train_dir} lacks: {', '.join(extra)}",
                                test_dir, expected="the same class folders under train/ and test/")
        test_samples = make_dataset(str(test_dir), folder.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise _folder_error(spec, f"the dataset folder {train_dir} has no images", train_dir,
                            expected="image files (" + " ".join(IMG_EXTENSIONS) + ") in class sub-folders")
    readable = _scan([p for p, _ in samples + val_samples + test_samples])
    bad = [p for (p, _), ok in zip(samples + val_samples + test_samples, readable) if not ok]
    if bad:
        log.warning("skipping %d unreadable image file(s) under %s, e.g. %s", len(bad), root, ", ".join(bad[:3]))
    skip = set(bad)
    samples = [s for s in samples if s[0] not in skip]
    val_samples = [s for s in val_samples if s[0] not in skip]
    test_samples = [s for s in test_samples if s[0] not in skip]
    present = {t for _, t in samples}
    empty = [c for i, c in enumerate(folder.classes) if i not in present]
    if empty:
        raise _folder_error(spec, f"some class folders under {train_dir} have no readable images: "
                            + ", ".join(empty), train_dir, expected="at least one image per class",
                            hint="remove the empty folders or add images")
    if train_dir == root:
        source = _FileSource(samples, list(folder.classes))
        return (*_split(spec, source), len(bad), None)
    source = _FileSource(samples + val_samples + test_samples, list(folder.classes))
    n, m = len(samples), len(samples) + len(val_samples)
    test = _Pool(source, np.arange(m, len(source))) if test_samples else None
    return _Pool(source, np.arange(n)), _Pool(source, np.arange(n, m)), len(bad), test


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped if the name ends in .gz) into an array.

    Raises:
        ValueError: if the file is not IDX or is cut short.
    """
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is cut short in its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(dtypes[data[2]])
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path} holds {len(data) - header} bytes of data, its header says shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _fashion_mnist(spec: Spec) -> tuple[_Pool, _Pool, int]:
    root = spec.resolve_path(spec.data.root, ("data", "root")) if spec.data.root else FASHION_MNIST_DIR
    arrays = {}
    for part, stem in (("train_x", "train-images-idx3-ubyte"), ("train_y", "train-labels-idx1-ubyte"),
                       ("val_x", "t10k-images-idx3-ubyte"), ("val_y", "t10k-labels-idx1-ubyte")):
        path = next((root / (stem + ext) for ext in ("", ".gz") if (root / (stem + ext)).is_file()), None)
        if path is None:
            raise spec.error(("data", "root"), f"Fashion-MNIST is not in {root}", found=f"no {stem}[.gz] in {root}",
                             expected="the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                             "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz)",
                             hint="apt-get install dataset-fashion-mnist, or set data.root to a folder with them")
        try:
            arrays[part] = read_idx(path)
        except (OSError, ValueError, EOFError) as exc:
            raise spec.error(("data", "root"), f"cannot read {path}: {exc}", found=str(path),
                             expected="an IDX file as published by Fashion-MNIST") from None
    pools = []
    for x, y in (("train_x", "train_y"), ("val_x", "val_y")):
        if arrays[x].ndim != 3 or len(arrays[x]) != len(arrays[y]):
            raise spec.error(("data", "root"), f"the Fashion-MNIST files in {root} do not match",
                             found=f"images {arrays[x].shape}, labels {arrays[y].shape}",
                             expected="N images of HxW and N labels")
        source = _ArraySource(arrays[x].astype(np.uint8, copy=False), arrays[y], list(FASHION_MNIST_CLASSES))
        pools.append(_Pool(source, np.arange(len(source))))
    return pools[0], pools[1], 0


def _norm_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _torchvision_classes() -> dict[str, type]:
    import torchvision.datasets as tvd
    from torchvision.datasets import VisionDataset

    skip = {"ImageFolder", "DatasetFolder", "FakeData", "VisionDataset"}
    return {_norm_name(n): getattr(tvd, n) for n in tvd.__all__
            if n not in skip and inspect.isclass(getattr(tvd, n)) and issubclass(getattr(tvd, n), VisionDataset)}


def _torchvision(spec: Spec, cls: type) -> tuple[_Pool, _Pool, int]:
    root = (spec.resolve_path(spec.data.root, ("data", "root")) if spec.data.root
            else Path(torch.hub.get_dir()).parent / "datasets")
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"root": str(root)}
    if "download" in params:
        kwargs["download"] = spec.data.download
    name = spec.data.name

    def make(**split: Any) -> Any:
        try:
            return cls(**kwargs, **split)
        except (RuntimeError, FileNotFoundError) as exc:
            if spec.data.download:
                raise spec.error(("data", "download"), f"{name} could not be downloaded to {root}: {exc}",
                                 found="download: true", hint=f"place the files under {root} yourself") from None
            raise spec.error(("data", "root"), f"{name} is not in {root}", found=str(exc).strip(),
                             expected=f"the {cls.__name__} files under {root}",
                             hint="set data.download: true, or place the files under data.root") from None
        except OSError as exc:  # network failures while downloading
            raise spec.error(("data", "download"), f"{name} could not be downloaded to {root}: {exc}",
                             found="download: true", hint=f"place the files under {root} yourself") from None

    def first_split(names: Sequence[str]) -> Any:
        for split in names:
            try:
                return make(split=split)
            except SpecError:
                raise
            except ValueError:  # torchvision's verify_str_arg: not a split of this dataset
                continue
        return None

    if "train" in params:
        train, val = make(train=True), make(train=False)
    elif "split" in params:
        train = first_split(("train", "trainval", "train-standard"))
        val = first_split(("val", "valid", "validation", "test"))
        if train is None or val is None:
            raise spec.error(("data", "name"), f"{name}: cannot tell which splits are train and val",
                             found=name, expected="a torchvision dataset with train/val or train/test splits",
                             hint="export it as an image folder and use name: imagefolder")
    else:
        train, val = make(), None
    sources = [_dataset_source(spec, d) for d in (train, val) if d is not None]
    if val is None:
        return (*_split(spec, sources[0]), 0)
    return _Pool(sources[0], np.arange(len(sources[0]))), _Pool(sources[1], np.arange(len(sources[1]))), 0


def _dataset_source(spec: Spec, dataset: Any) -> _DatasetSource:
    targets = None
    for attr in ("targets", "labels", "_labels", "y"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):
            array = np.asarray(value)
            if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
                targets = array
                break
    if targets is None:
        log.info("reading every label of %s one item at a time", type(dataset).__name__)
        targets = np.array([dataset[i][1] for i in range(len(dataset))])
        if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
            raise spec.error(("data", "name"), f"{type(dataset).__name__} has no integer class labels",
                             found=spec.data.name, expected="a classification dataset")
    classes = [str(c) for c in getattr(dataset, "classes", None) or []]
    if len(classes) <= int(targets.max(initial=0)):
        classes = [str(i) for i in range(int(targets.max(initial=0)) + 1)]
    return _DatasetSource(dataset, targets, classes)


_BUILTIN = {"digits": _digits, "fake": _fake, "imagefolder": _imagefolder, "csv": _csv,
            "fashion-mnist": _fashion_mnist, "fashion_mnist": _fashion_mnist}


def dataset_names() -> list[str]:
    """Dataset names `data.name` accepts without listing all of torchvision (for help and errors)."""
    return ["digits", "fake", "imagefolder", "csv", "fashion-mnist"] + list(_TORCHVISION_SHOWN)


def _pools(spec: Spec) -> tuple[_Pool, _Pool, int, _Pool | None]:
    """(train, val, unreadable files skipped, test or None) of `data.name`."""
    name = spec.data.name
    if name.lower() in _BUILTIN:
        train, val, skipped, *test = _BUILTIN[name.lower()](spec)
        return train, val, skipped, test[0] if test else None
    known = _torchvision_classes()
    if _norm_name(name) in known:
        return (*_torchvision(spec, known[_norm_name(name)]), None)
    raise spec.error(("data", "name"), f"unknown dataset {name!r}", found=repr(name),
                     expected="one of " + ", ".join(dataset_names()) + " (or another torchvision dataset class)",
                     hint=did_you_mean(name, dataset_names() + sorted(known)))


# --------------------------------------------------------------------------- class and size subsets
def _select_classes(spec: Spec, classes: list[str]) -> list[int]:
    """Original label of each class in `data.classes`, in the order given."""
    wanted = spec.data.classes
    if wanted is None:
        return list(range(len(classes)))
    chosen: list[int] = []
    for j, item in enumerate(wanted):
        where = ("data", "classes", j)
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise spec.error(where, "a class is given by name or index", found=repr(item))
        if isinstance(item, int):
            if not 0 <= item < len(classes):
                raise spec.error(where, "there is no class with this index", found=str(item),
                                 expected=f"an index from 0 to {len(classes) - 1}, or a class name")
            label = item
        elif item in classes:
            label = classes.index(item)
        else:
            hint = did_you_mean(item, classes)
            if hint is None and item.strip().isdigit():
                hint = f"write {item.strip()} without quotes to pick a class by index"
            shown = ", ".join(repr(c) for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise spec.error(where, f"there is no class named {item!r}", found=repr(item),
                             expected=f"one of the {len(classes)} classes: {shown}", hint=hint)
        if label in chosen:
            raise spec.error(where, f"the class {classes[label]!r} is listed twice", found=repr(item),
                             expected="each class once", hint=f"data.classes[{chosen.index(label)}] names it too")
        chosen.append(label)
    return chosen


def _narrow(spec: Spec, pool: _Pool, label_map: np.ndarray, side: str, stream: int) -> _Pool:
    indices = pool.indices[label_map[pool.source.targets[pool.indices]] >= 0]
    limit = getattr(spec.data.subset, side)
    if limit is not None and limit < len(indices):
        indices = indices[_stratified(label_map[pool.source.targets[indices]], limit, _rng(spec.seed, stream))]
    return _Pool(pool.source, indices)


# --------------------------------------------------------------------------- entry point
def _three(values: Any, key: str, channels: int = 3) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if channels == 1 and len(values) == 3:
        # one gray channel: the mean of the three (exact for backbones that normalise the three alike,
        # where the gray model then sees what the RGB model saw on the gray image repeated)
        return (sum(values) / 3,)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"data_config[{key!r}] has {len(values)} values; images here have {channels} channels")
    return values


def normalization(data_config: Mapping) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the backbone's data config, ImageNet's where it gives none; one value each
    when the model reads one channel (`input_size` (1, H, W))."""
    channels = tuple(data_config.get("input_size", (3,)))[0]
    return (_three(data_config.get("mean", IMAGENET_MEAN), "mean", channels),
            _three(data_config.get("std", IMAGENET_STD), "std", channels))


def build_data(spec: Spec, data_config: Mapping) -> DataBundle:
    """Datasets, class names and normalisation for `spec.data`.

    Args:
        spec: the loaded spec; `spec.data` picks the dataset, split, subsets and augmentation.
        data_config: the backbone's timm-style data config (mean, std, interpolation,
            crop_pct, crop_mode); the image size comes from `data.image_size`.

    Returns:
        A `DataBundle`; nothing but labels (and, for imagefolder, file headers) is read yet.

    Raises:
        SpecError: unknown dataset or class, missing or empty folder, files not on disk, ...

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}, "data": {"name": "digits"}})
        >>> build_data(spec, {"mean": (0.5,) * 3, "std": (0.5,) * 3}).describe
        'digits: 1437 train / 360 val, 10 classes, 32px'
    """
    train_pool, val_pool, skipped, test_pool = _pools(spec)
    classes = train_pool.source.classes
    chosen = _select_classes(spec, classes)
    label_map = np.full(len(classes), -1, dtype=np.int64)
    label_map[chosen] = np.arange(len(chosen))
    train_pool = _narrow(spec, train_pool, label_map, "train", 1)
    val_pool = _narrow(spec, val_pool, label_map, "val", 2)
    if len(train_pool.indices) == 0:
        raise spec.error(("data", "classes"), "no training images are left after choosing classes",
                         found=str(list(spec.data.classes)), expected="classes that have images")
    train_tf, deterministic = _train_transform(spec, data_config)
    size = spec.data.image_size
    train = _Split(train_pool, label_map, train_tf, spec.seed, augment=not deterministic)
    val = _Split(val_pool, label_map, eval_transform(data_config, size), spec.seed, augment=False)
    test = None
    if test_pool is not None:
        test = _Split(_Pool(test_pool.source, test_pool.indices[label_map[test_pool.source.targets[test_pool.indices]] >= 0]),
                      label_map, eval_transform(data_config, size), spec.seed, augment=False)
    names = [classes[i] for i in chosen]
    mean, std = normalization(data_config)
    held_out = f" / {len(test)} test" if test is not None else ""
    describe = f"{spec.data.name}: {len(train)} train / {len(val)} val{held_out}, {len(names)} classes, {size}px"
    if skipped:
        describe += f", {skipped} unreadable files skipped"
    return DataBundle(
        train=train,
        val=val,
        classes=names,
        mean=mean,
        std=std,
        deterministic_train=deterministic,
        describe=describe,
        test=test,
    )


__all__ = ["DataBundle", "EpochLoader", "build_data", "eval_transform", "normalize", "make_loader",
           "read_idx", "dataset_names", "normalization", "class_weights"]
