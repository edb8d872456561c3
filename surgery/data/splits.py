"""Splits and subsets: a seeded, stratified train/val split, a held-out test split, `data.classes`
and `data.subset`; each only ever shrinks an index array.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import did_you_mean
from ..spec import Spec
from .sources import FileSource, ImageSource, Pool, SplitDataset


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def stratified(targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
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


def train_val_split(spec: Spec, source: ImageSource, indices: np.ndarray | None = None) -> tuple[Pool, Pool]:
    """Hold out `val_split` of a pool, stratified and seeded; fixed before any class filtering,
    so an image stays on its side whatever `data.classes` and `data.subset` say."""
    indices = np.arange(len(source)) if indices is None else indices
    n_val = math.ceil(spec.data.val_split * len(indices))  # as scikit-learn rounds test_size
    val_pos = stratified(source.targets[indices], n_val, seeded_rng(spec.seed, 0))
    is_val = np.zeros(len(indices), dtype=bool)
    is_val[val_pos] = True
    if n_val >= len(indices):
        raise spec.error(
            ("data", "val_split"),
            "val_split leaves no images to train on",
            found=f"{spec.data.val_split} of {len(indices)} images",
            expected="a smaller fraction",
        )
    return Pool(source, indices[~is_val]), Pool(source, indices[is_val])


def test_split(spec: Spec, pool: Pool) -> tuple[Pool, Pool]:
    """Hold out `data.test_split` of the training pool as a test set: (train, test).

    Carved from what training would otherwise use, after the validation set is fixed, so the
    validation set (and every figure on it) is the same with or without a test set. Stratified
    and seeded on its own stream, and made before `data.classes` and `data.subset` filter
    anything, so an image stays on its side whatever they say and `surgery evaluate` rebuilds
    exactly these images from the run's spec.
    """
    indices = pool.indices
    n_test = math.ceil(spec.data.test_split * len(indices))
    if n_test >= len(indices):
        raise spec.error(
            ("data", "test_split"),
            "test_split leaves no images to train on",
            found=f"{spec.data.test_split} of {len(indices)} training images",
            expected="a smaller fraction",
        )
    is_test = np.zeros(len(indices), dtype=bool)
    is_test[stratified(pool.source.targets[indices], n_test, seeded_rng(spec.seed, 3))] = True
    return Pool(pool.source, indices[~is_test]), Pool(pool.source, indices[is_test])


def fingerprint(items: Iterable[tuple[str, int]]) -> str:
    """A digest of (identity, label) pairs: equal exactly when a split holds the same images with the
    same labels in the same order (identities: file paths relative to the data root, or indices)."""
    digest = hashlib.sha256()
    for identity, label in items:
        digest.update(f"{identity}\t{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def select_classes(spec: Spec, classes: list[str]) -> list[int]:
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
                raise spec.error(
                    where,
                    "there is no class with this index",
                    found=str(item),
                    expected=f"an index from 0 to {len(classes) - 1}, or a class name",
                )
            label = item
        elif item in classes:
            label = classes.index(item)
        else:
            hint = did_you_mean(item, classes)
            if hint is None and item.strip().isdigit():
                hint = f"write {item.strip()} without quotes to pick a class by index"
            shown = ", ".join(repr(c) for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise spec.error(
                where,
                f"there is no class named {item!r}",
                found=repr(item),
                expected=f"one of the {len(classes)} classes: {shown}",
                hint=hint,
            )
        if label in chosen:
            raise spec.error(
                where,
                f"the class {classes[label]!r} is listed twice",
                found=repr(item),
                expected="each class once",
                hint=f"data.classes[{chosen.index(label)}] names it too",
            )
        chosen.append(label)
    return chosen


def narrow(spec: Spec, pool: Pool, label_map: np.ndarray, side: str, stream: int) -> Pool:
    indices = pool.indices[label_map[pool.source.targets[pool.indices]] >= 0]
    limit = getattr(spec.data.subset, side)
    if limit is not None and limit < len(indices):
        indices = indices[stratified(label_map[pool.source.targets[indices]], limit, seeded_rng(spec.seed, stream))]
    return Pool(pool.source, indices)


def item_ids(dataset: SplitDataset, base: Path | None = None) -> list[str]:
    """What names each item of a split: its file path (relative to `base` when under it) or, for
    datasets held in memory, its index in the dataset (stable across runs on the same files)."""
    source = dataset.source
    if isinstance(source, FileSource):
        paths = [source.paths[int(i)] for i in dataset.indices]
        if base is None:
            return paths
        return [os.path.relpath(p, base) if Path(p).is_relative_to(base) else p for p in paths]
    return [str(int(i)) for i in dataset.indices]


def data_base(spec: Spec) -> Path | None:
    """The folder a spec's data lives in (the CSV file's folder for csv), absolute; None when the
    dataset is not read from `data.root`."""
    if spec.data.root is None:
        return None
    root = spec.resolve_path(spec.data.root, ("data", "root")).absolute()
    return root.parent if root.is_file() else root


def split_record(spec: Spec, splits: Mapping[str, SplitDataset | None]) -> dict[str, Any]:
    """`splits.json`: where the data was and a fingerprint of each split, so that `surgery evaluate`
    rebuilds the run's test split from the same folder and refuses one whose images changed."""
    base = data_base(spec)
    record: dict[str, Any] = {
        "data_root": str(spec.resolve_path(spec.data.root, ("data", "root")).absolute())
        if spec.data.root is not None
        else None,
        "seed": spec.seed,
        "val_split": spec.data.val_split,
        "test_split": spec.data.test_split,
    }
    for name, dataset in splits.items():
        if dataset is None:
            record[name] = None
            continue
        labels = dataset.targets.tolist()
        record[name] = {"images": len(dataset), "fingerprint": fingerprint(zip(item_ids(dataset, base), labels))}
    return record
