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

    sources.py     sources (arrays, datasets, files) and the epoch-seeded dataset over them
    datasets.py    the datasets data.name names
    splits.py      train/val/test split, data.classes, data.subset, splits.json
    scan.py        the kept image files: readable, regular, each image in one split
    transforms.py  eval and training transforms, normalize (on the device)
    loader.py      make_loader: epoch-seeded, resumable, sharded, optionally class-balanced
    __init__.py    DataBundle and build_data, the entry point
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..model.backbones import IMAGENET_MEAN, IMAGENET_STD
from ..spec import Spec
from .datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, dataset_names, fashion_mnist_dir, pools, read_idx
from .loader import EpochLoader, class_weights, make_loader, pos_weights, train_counts
from .scan import check_files
from .sources import Pool, SplitDataset
from .splits import data_base, item_ids, narrow, select_classes, split_record, test_split
from .transforms import TTAViews, eval_transform, image_mode, normalize, train_transform


# --------------------------------------------------------------------------- public types
@dataclass
class DataBundle:
    """Train and val datasets for a spec, ready for `make_loader`.

    Items of `train` and `val` are ``(uint8 tensor 3xHxW, int label in 0..K-1)`` (with
    ``data.multi_label``, a float32 multi-hot tensor of K instead of the int); they may be
    indexed by ``index`` or by ``(epoch, index)`` (the key `make_loader` uses).
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, ...]  # one per input channel
    std: tuple[float, ...]
    deterministic_train: bool
    describe: str
    test: Dataset | None = (
        None  # a held-out test set (imagefolder test/, csv split=test, data.test_split), eval transform
    )


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
    return (
        _three(data_config.get("mean", IMAGENET_MEAN), "mean", channels),
        _three(data_config.get("std", IMAGENET_STD), "std", channels),
    )


def build_data(spec: Spec, data_config: Mapping) -> DataBundle:
    """Datasets, class names and normalisation for `spec.data`.

    Args:
        spec: the loaded spec; `spec.data` picks the dataset, split, subsets and augmentation.
        data_config: the backbone's timm-style data config (mean, std, interpolation,
            crop_pct, crop_mode); the image size comes from `data.image_size`.

    Returns:
        A `DataBundle`; nothing but labels (and, for files, the headers of the images kept) is read yet.

    Raises:
        SpecError: unknown dataset or class, missing or empty folder, files not on disk, ...

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}, "data": {"name": "digits"}})
        >>> build_data(spec, {"mean": (0.5,) * 3, "std": (0.5,) * 3}).describe
        'digits: 1437 train / 360 val, 10 classes, 32px'
    """
    train_pool, val_pool, skipped, test_pool = pools(spec)
    if spec.data.test_split:
        if test_pool is not None:
            raise spec.error(
                ("data", "test_split"),
                "this dataset has a test split of its own",
                found=f"test_split: {spec.data.test_split}, and {len(test_pool.indices)} test images in "
                f"{spec.data.root}",
                expected="test_split: 0 (the dataset's own test images are held out already)",
                hint="remove data.test_split, or the test images (an image folder's test/, csv rows with split test)",
            )
        train_pool, test_pool = test_split(spec, train_pool)
    classes = train_pool.source.classes
    chosen = select_classes(spec, classes)
    label_map = np.full(len(classes), -1, dtype=np.int64)
    label_map[chosen] = np.arange(len(chosen))
    train_pool = narrow(spec, train_pool, label_map, "train", 1)
    val_pool = narrow(spec, val_pool, label_map, "val", 2)
    if test_pool is not None:
        test_pool = Pool(
            test_pool.source, test_pool.indices[label_map[test_pool.source.targets[test_pool.indices]] >= 0]
        )
    # only now are files touched: those the splits, classes and subsets kept
    checked, unreadable = check_files(spec, {"train": train_pool, "val": val_pool, "test": test_pool})
    train_pool, val_pool, test_pool = checked["train"], checked["val"], checked["test"]
    skipped += unreadable
    if len(train_pool.indices) == 0:
        raise spec.error(
            ("data", "classes"),
            "no training images are left after choosing classes",
            found=str(list(spec.data.classes)),
            expected="classes that have images",
        )
    train_tf, deterministic = train_transform(spec, data_config)
    size = spec.data.image_size
    train = SplitDataset(train_pool, label_map, train_tf, spec.seed, augment=not deterministic)
    val = SplitDataset(val_pool, label_map, eval_transform(data_config, size), spec.seed, augment=False)
    test = None
    if test_pool is not None:
        test = SplitDataset(test_pool, label_map, eval_transform(data_config, size), spec.seed, augment=False)
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


__all__ = [
    "DataBundle",
    "EpochLoader",
    "build_data",
    "eval_transform",
    "normalize",
    "make_loader",
    "read_idx",
    "dataset_names",
    "normalization",
    "class_weights",
    "image_mode",
    "FASHION_MNIST_DIR",
    "fashion_mnist_dir",
    "FASHION_MNIST_CLASSES",
    "pos_weights",
    "train_counts",
    "split_record",
    "item_ids",
    "data_base",
    "TTAViews",
]
