"""The image files a run will read, checked once its splits and subsets are fixed.

Only the files kept by the split, `data.classes` and `data.subset` are touched: a CSV of a
million rows with `subset: {train: 500}` stats and opens about 500 files, not a million. Each kept
file is checked without blocking (a named pipe or a device listed as an image is skipped with a
note, as `surgery predict` does) and PIL reads its header; unreadable, missing and non-regular
files are skipped with one warning that names them (and the CSV line that listed them).

The same image in two splits (train and val, train and test, val and test) would inflate every
figure measured on the second, so it is refused, naming both places; listed twice within one
split it is only warned about. Two entries are the same image when their resolved paths are equal
(symbolic links followed, `a/../b` collapsed); hard links and byte-identical copies are not
compared.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..errors import printable
from ..files import NotRegularFile, open_regular
from ..spec import Spec
from .sources import UNREADABLE, FileSource, Pool

log = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0  # seconds between progress lines on stderr while a long scan runs
_SHOWN = 3  # files named in a warning or an error


def probe(path: str) -> tuple[str | None, str]:
    """(None, resolved path) for a regular file PIL can identify (header only; a truncated body is
    caught when loaded); else (why not, the path)."""
    try:
        with open_regular(path) as f, Image.open(f) as image:
            ok = image.size[0] > 0 and image.size[1] > 0
    except NotRegularFile as exc:
        return f"not a regular file ({exc.reason})", path
    except FileNotFoundError:
        return "no such file", path
    except UNREADABLE as exc:
        return f"unreadable ({exc.__class__.__name__})", path
    return (None if ok else "an empty image"), os.path.realpath(path)


def _probe_all(paths: Sequence[str], what: str) -> list[tuple[str | None, str]]:
    """`probe` on every path, on a few threads; a line on stderr every few seconds of a long scan."""
    out: list[tuple[str | None, str]] = []
    start = last = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for result in pool.map(probe, paths, chunksize=64):
            out.append(result)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY:
                last = now
                sys.stderr.write(
                    f"checking the image files of {what}: {len(out):,} of {len(paths):,} ({now - start:.0f} s)\n"
                )
                sys.stderr.flush()
    return out


def check_files(spec: Spec, pools: Mapping[str, Pool | None]) -> tuple[dict[str, Pool | None], int]:
    """The pools without their unreadable files, and how many were skipped.

    Args:
        pools: split name (train, val, test) -> the pool as split, class-filtered and subset.

    Raises:
        SpecError (at data.root): an image in two splits; a class whose every kept training
            image is unreadable.
    """
    out: dict[str, Pool | None] = dict(pools)
    files = {name: p for name, p in pools.items() if p is not None and isinstance(p.source, FileSource)}
    if not files:
        return out, 0
    source = next(iter(files.values())).source  # one listing per dataset: its splits share the source
    kept = np.unique(np.concatenate([p.indices for p in files.values()]))
    results = _probe_all([source.paths[int(i)] for i in kept], spec.data.name)
    reason = {int(i): why for i, (why, _) in zip(kept, results) if why is not None}
    resolved = {int(i): real for i, (why, real) in zip(kept, results) if why is None}
    if reason:
        shown = ", ".join(f"{source.where(i)}: {why}" for i, why in list(reason.items())[:_SHOWN])
        log.warning(
            "skipping %d unreadable, missing or non-regular image file(s) of %s, e.g. %s",
            len(reason),
            printable(spec.data.root or spec.data.name),
            printable(shown),
        )
    before = {name: set(source.targets[p.indices].tolist()) for name, p in files.items()}
    for name, p in files.items():
        out[name] = Pool(source, np.array([i for i in p.indices if int(i) not in reason], dtype=np.int64))
    _check_duplicates(spec, source, {name: out[name] for name in files}, resolved)
    if "train" in files and source.multi_hot is None:
        lost = before["train"] - set(source.targets[out["train"].indices].tolist())
        if lost:
            raise spec.error(
                ("data", "root"),
                "some classes have no readable training image: " + ", ".join(source.classes[c] for c in sorted(lost)),
                found=str(spec.data.root),
                expected="at least one readable training image per class",
                hint="replace the unreadable files, or remove their rows or folders",
            )
    return out, len(reason)


def _check_duplicates(spec: Spec, source: FileSource, pools: Mapping[str, Pool], resolved: Mapping[int, str]) -> None:
    seen: dict[str, list[tuple[str, int]]] = {}
    for name, p in pools.items():
        for i in p.indices:
            seen.setdefault(resolved[int(i)], []).append((name, int(i)))
    twice = [places for places in seen.values() if len(places) > 1]
    across = [places for places in twice if len({name for name, _ in places}) > 1]

    def listed(places: list[tuple[str, int]]) -> str:
        return " and ".join(f"{source.where(i)} in {name}" for name, i in places)

    if across:
        splits = sorted({name for places in across for name, _ in places}, key=["train", "val", "test"].index)
        raise spec.error(
            ("data", "root"),
            f"{len(across)} image(s) are in more than one split ("
            + " and ".join(splits)
            + "): figures on the second would be inflated",
            found="; ".join(listed(p) for p in across[:_SHOWN]) + ("; ..." if len(across) > _SHOWN else ""),
            expected="each image in one split (images compared by resolved path: symbolic links "
            "followed; hard links and copies are not detected)",
            hint="remove the extra rows or links"
            if source.listed_at is not None
            else "remove the copies or links between the split folders",
        )
    if twice:
        log.warning(
            "%d image(s) are listed more than once in one split (compared by resolved path), e.g. %s",
            len(twice),
            printable("; ".join(listed(p) for p in twice[:_SHOWN])),
        )


__all__ = ["check_files", "probe", "PROGRESS_EVERY"]
