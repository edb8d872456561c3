"""The runs `surgery average` reads: finished, of one architecture and one class list, on one split.

Everything is checked before any model is built, and every mistake names the run and the key that
differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import Origin, UsageError
from ..runs import Run, layout, open_run

# the spec sections that decide the architecture and its starting point: runs averaged must agree on them
SAME_SECTIONS = ("model", "surgery")


@dataclass
class Source:
    """One finished run: its folder, summary.json and spec.yaml as plain YAML."""

    run: Run
    summary: dict[str, Any]
    raw: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def val_score(self) -> float:
        """The recorded validation figure of its final model (mAP for a multi-label run)."""
        key = "final_val_map" if self.summary.get("multi_label") else "final_val_acc"
        value = self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) else float("-inf")


def read_sources(paths: Sequence[str | Path]) -> list[Source]:
    """Finished runs (summary.json, spec.yaml, model.safetensors), checked to be averageable together.

    Raises:
        UsageError: a run that is not finished, or runs that differ in architecture, classes or split.
    """
    sources = []
    for path in paths:
        run = open_run(path)
        summary, raw = run.require_finished()
        run.require_trained("final")
        sources.append(Source(run, summary, raw))
    for other in sources[1:]:
        check_same(sources[0], other)
    return sources


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two plain values differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            where = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if where is not None:
                return where
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            where = first_difference(x, y, f"{path}[{i}]")
            if where is not None:
                return where
        return None
    return None if a == b else path


def _value_at(raw: Any, path: str) -> Any:
    import re

    value = raw
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def check_same(first: Source, other: Source) -> None:
    """Raise unless `other` builds the architecture `first` builds, for the same classes, on the same split."""
    for section in SAME_SECTIONS:
        where = first_difference({section: first.raw.get(section)}, {section: other.raw.get(section)})
        if where is not None:
            raise _differ(
                first,
                other,
                f"{layout.SPEC} {where}",
                _value_at(first.raw, where),
                _value_at(other.raw, where),
                "runs of one architecture from one starting point: the same model and surgery sections",
            )
    if first.run.written_classes() != other.run.written_classes():
        raise _differ(
            first, other, layout.CLASSES, first.run.written_classes(), other.run.written_classes(), "one class list"
        )
    mine, theirs = first.run.require_splits() or {}, other.run.require_splits() or {}
    for split in ("train", "val"):
        a, b = (mine.get(split) or {}).get("fingerprint"), (theirs.get(split) or {}).get("fingerprint")
        if a != b:
            raise _differ(
                first,
                other,
                f"{layout.SPLITS} {split}.fingerprint",
                a,
                b,
                "runs trained and validated on the same images (validation chooses the soup)",
                hint="spec.seed draws the split (and data.subset): average runs of one seed that differ "
                "in their hyperparameters (a sweep's trials), or give every run the same seed",
            )


def _differ(
    first: Source, other: Source, key: str, a: Any, b: Any, expected: str, hint: str | None = None
) -> UsageError:
    return UsageError(
        f"{other.path} differs from {first.path} in {key}",
        origin=Origin.path(other.path),
        found=f"{key}: {a!r} in {first.path}, {b!r} in {other.path}",
        expected=expected,
        hint=hint
        or "average only runs of one spec that differ in their training hyperparameters (lr, augmentation, epochs)",
    )


__all__ = ["Source", "SAME_SECTIONS", "read_sources", "check_same", "first_difference"]
