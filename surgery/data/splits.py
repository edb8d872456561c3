"""Splits and subsets: a seeded, stratified train/val split, `data.classes` and `data.subset`;
each only ever shrinks an index array.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import did_you_mean
from ..spec import Spec
from .sources import ImageSource, Pool


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
        raise spec.error(("data", "val_split"), "val_split leaves no images to train on",
                         found=f"{spec.data.val_split} of {len(indices)} images", expected="a smaller fraction")
    return Pool(source, indices[~is_val]), Pool(source, indices[is_val])


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


def narrow(spec: Spec, pool: Pool, label_map: np.ndarray, side: str, stream: int) -> Pool:
    indices = pool.indices[label_map[pool.source.targets[pool.indices]] >= 0]
    limit = getattr(spec.data.subset, side)
    if limit is not None and limit < len(indices):
        indices = indices[stratified(label_map[pool.source.targets[indices]], limit, seeded_rng(spec.seed, stream))]
    return Pool(pool.source, indices)
