"""`base:`: a spec written as changes to other spec files.

    base: common.yaml                 # a path relative to the file that writes it
    base: [common.yaml, cifar.yaml]   # several, merged in order: a later one wins

The bases are merged first, in order, then the spec itself on top; `--set` comes last. Mappings
merge key by key, at every depth; anything else (a list, a number, a string, null) replaces what
was there whole, so `surgery:` or `groups:` in a spec replaces the base's list rather than adding
to it. A base may have a `base:` of its own. A base's `name` is not inherited: a run is named by
its own spec (`name:` or the file name).

Every merged value keeps the mark of the file and line it was written on (`Source.marks`), so a
later error about a value inherited from a base names the base file and its line, and a relative
path (`data.root`, `model.pretrained`) is read relative to the file that wrote it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import did_you_mean, quote_value, shorten
from ..files import PATH_PROBLEMS, not_regular, problem
from .source import _MAX_BYTES, _MAX_VALUES, Mark, Source, _size, parse_yaml, read_spec_text

BASE_KEY = "base"
# a spec and its bases together read at most this many files (a base read twice, through two
# routes, counts twice): a few files of settings is the use; lists of bases of lists of bases
# are how a page of YAML asks for exponential work
_MAX_FILES = 32


@dataclass
class _Reading:
    """What resolving one spec has read so far, to bound it."""

    files: int = 0
    chain: list[tuple[Path, str]] = field(default_factory=list)  # (resolved path, label) of the bases open now


def resolve_bases(data: Any, marks: dict[tuple, Mark], file: str | None) -> Any:
    """`data` with its `base:` files merged under it, recursively; `marks` updated in place.

    Args:
        data: a spec as parsed (`source.parse_yaml`), or given as a dict (then `file` is None and
            bases are relative to the working directory).
        marks: key path -> (file, line, column) of `data`; on return, of the merged result, each
            value marked where it was written (a base's own file and line when it came from there).
        file: the spec's file as the user named it, or None.

    Returns:
        The merged data, without `base`. Data without `base` (or not a mapping) is returned as is.

    Raises:
        SpecError: `base` of the wrong kind, a base that is missing, not a mapping or part of a
            cycle, or more than `_MAX_FILES` files or `_MAX_VALUES` values in all; located at the
            `base:` line that named it, or in the base file for a mistake inside it.
    """
    if not isinstance(data, dict) or BASE_KEY not in data:
        return data
    reading = _Reading()
    if file is not None and not file.startswith("<"):
        reading.chain.append((Path(file).resolve(), file))
    merged, tree = _resolve(data, _tree(marks), file, Source(file).folder, reading)
    marks.clear()
    marks.update(_flat(tree))
    return merged


def _resolve(data: dict, tree: dict, file: str | None, folder: Path, reading: _Reading) -> tuple[dict, dict]:
    if BASE_KEY not in data:
        return data, tree
    source = Source(file, _flat(tree))
    refs = _references(data.pop(BASE_KEY), source)
    tree["kids"].pop(BASE_KEY, None)
    merged: dict = {}
    merged_tree: dict = {"mark": tree.get("mark"), "kids": {}}
    for where, ref in refs:
        base_data, base_tree = _read_base(ref, where, source, folder, reading)
        _merge(merged, merged_tree, base_data, base_tree)
        _check_size(merged, source, where)
    _merge(merged, merged_tree, data, tree)
    _check_size(merged, source, (BASE_KEY,))
    merged_tree["mark"] = tree.get("mark")
    return merged, merged_tree


def _references(value: Any, source: Source) -> list[tuple[tuple, str]]:
    """The base paths and where each was written; a located error for anything but a path or a list of them."""
    expected = "a spec file's path (relative to this file), or a list of them: base: common.yaml"
    if isinstance(value, str):
        items, where = [value], [(BASE_KEY,)]
    elif isinstance(value, list):
        items, where = value, [(BASE_KEY, i) for i in range(len(value))]
    else:
        raise source.error(
            (BASE_KEY,), "base takes a path or a list of paths", found=quote_value(value), expected=expected
        )
    for item, at in zip(items, where):
        if not isinstance(item, str) or not item.strip():
            raise source.error(at, "a base is the path of a spec file", found=quote_value(item), expected=expected)
    return list(zip(where, items))


def _label(path: Path) -> str:
    """How errors name a base file: relative to the working directory when it lies below it."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _read_base(ref: str, where: tuple, source: Source, folder: Path, reading: _Reading) -> tuple[dict, dict]:
    """One base file, its own bases merged in: (data, marks tree)."""
    path = folder / Path(ref).expanduser()
    why = not_regular(path)
    if why is not None:
        hint = None
        if why == "no such file" and not_regular(path.parent) == "a folder":
            hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")])
        shown = shorten(os.path.normpath(path), 300)
        raise source.error(
            where,
            problem("base", why, "the base is not a file"),
            found=shown if why in ("no such file", *PATH_PROBLEMS) else f"{shown} ({why})",
            expected="the path of a spec file, relative to the file that names it",
            hint=hint,
        )
    resolved, label = path.resolve(), _label(path)
    chain = [name for _, name in reading.chain]
    if any(resolved == open_path for open_path, _ in reading.chain):
        cycle = " -> ".join(chain[[p for p, _ in reading.chain].index(resolved) :] + [label])
        raise source.error(
            where,
            f"the bases form a cycle: {cycle}",
            found=quote_value(ref),
            expected="bases that do not lead back to this file",
            hint="a spec cannot be its own base: drop one base entry of the cycle",
        )
    reading.files += 1
    if reading.files > _MAX_FILES:
        raise source.error(
            where,
            f"the spec and its bases read more than {_MAX_FILES} files",
            found=" -> ".join(chain + [label]),
            expected=f"at most {_MAX_FILES} files in all",
            hint="a base named in several places is read once for each",
        )
    data, marks = parse_yaml(read_spec_text(path), label)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {'list' if isinstance(data, list) else type(data).__name__}"
        raise source.error(
            where,
            f"the base file {label} is {kind}, not a mapping of spec keys",
            found=quote_value(data),
            expected="a spec file: a mapping such as `train: {epochs: 10}`",
        )
    tree = _tree(marks)
    data.pop("name", None)  # a run is named by its own spec, never by a base it shares with others
    tree["kids"].pop("name", None)
    reading.chain.append((resolved, label))
    try:
        return _resolve(data, tree, label, resolved.parent, reading)
    finally:
        reading.chain.pop()


# --------------------------------------------------------------------------- merging with marks
# Marks as a tree that mirrors the data ({"mark": ..., "kids": {key: subtree}}): a value replaced
# whole takes its marks along in one step, where the flat key-path table would be scanned per key.
def _tree(marks: dict[tuple, Mark]) -> dict:
    root: dict = {"mark": None, "kids": {}}
    for path, mark in marks.items():
        node = root
        for part in path:
            node = node["kids"].setdefault(part, {"mark": None, "kids": {}})
        node["mark"] = mark
    return root


def _flat(tree: dict) -> dict[tuple, Mark]:
    out: dict[tuple, Mark] = {}
    stack: list[tuple[tuple, dict]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if node["mark"] is not None:
            out[path] = node["mark"]
        stack.extend((path + (key,), kid) for key, kid in node["kids"].items())
    return out


def _merge(low: dict, low_tree: dict, high: dict, high_tree: dict) -> None:
    """Merge `high` into `low` in place: mappings key by key, anything else replaced whole."""
    empty = {"mark": None, "kids": {}}
    for key, value in high.items():
        kid = high_tree["kids"].get(key, empty)
        if isinstance(value, dict) and isinstance(low.get(key), dict):
            below = low_tree["kids"].setdefault(key, {"mark": None, "kids": {}})
            _merge(low[key], below, value, kid)
            below["mark"] = kid["mark"] or below["mark"]  # the key as the later file wrote it
        else:
            low[key] = value
            low_tree["kids"][key] = kid


def _check_size(data: Any, source: Source, where: tuple) -> None:
    """The merged spec within the bounds one file is held to (`source._MAX_VALUES`, `_MAX_BYTES`)."""
    values = size = 0
    stack = [data]
    while stack:
        value = stack.pop()
        values += 1
        if isinstance(value, dict):
            stack.extend(value.values())
            size += sum(len(str(k)) for k in value)
            values += len(value)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            size += len(value)
        if values > _MAX_VALUES or size > _MAX_BYTES:
            limit = f"{_MAX_VALUES} values" if values > _MAX_VALUES else f"{_size(_MAX_BYTES)} of text"
            raise source.error(
                where,
                f"the spec and its bases together hold more than {limit}",
                found="the bases named here",
                expected="a spec of plain size",
            )


__all__ = ["resolve_bases", "BASE_KEY"]
