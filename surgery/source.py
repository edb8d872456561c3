"""Where spec values come from: YAML text read into plain data with the file, line and column of
every key path (a `Source`), and `--set key.path=value` overrides applied on top.

Every later phase reports a mistake through `Source.locate`, so an error names the line the
offending value was written on, or the `--set` flag that gave it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import Origin, SpecError, format_path, quote_value

Mark = tuple  # (file, line, column)


# --------------------------------------------------------------------------- YAML with marks
class _Loader(yaml.SafeLoader):
    """Safe YAML (no object construction) that also reads 1e-3 as a float, as users mean it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(exc: yaml.YAMLError, file: str) -> SpecError:
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None) or ""
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    mark, hint = problem_mark or context_mark, None
    if context_mark is not None and ("flow" in context or "quoted" in context) and (
            problem_mark is None or problem_mark.line > context_mark.line):
        # an unclosed bracket or quote: the parser notices lines later; the culprit is where it opened
        what = "quote" if "quoted" in context else "bracket"
        at = f" (line {problem_mark.line + 1})" if problem_mark is not None else ""
        problem, mark = f"the {what} opened here is never closed: {problem}{at}", context_mark
    elif "'\\t'" in problem or "\t" in problem:
        hint = "indent with spaces: YAML does not allow tabs"
    elif "expected alphabetic or numeric character" in problem or "cannot start any token" in problem:
        hint = "YAML reads a value that starts with *, &, !, @ or ` as syntax: quote it, e.g. params: '*' or at: '@head'"
    return SpecError(
        f"this is not valid YAML: {problem}",
        file=file,
        line=mark.line + 1 if mark else None,
        column=mark.column + 1 if mark else None,
        expected="a YAML mapping such as `model: {backbone: torchvision:resnet18}`",
        hint=hint,
    )


def _reader_error(exc: yaml.reader.ReaderError, text: str, file: str) -> SpecError:
    before = text[: exc.position]
    return SpecError(f"this is not valid YAML: the character {exc.character!r} is not allowed", file=file,
                     line=before.count("\n") + 1, column=len(before) - before.rfind("\n"),
                     expected="printable text", hint="remove the control character (often pasted from a terminal)")


def read_spec_text(path: Path) -> str:
    """The text of a spec file; a located SpecError when it is missing or unreadable."""
    from .errors import did_you_mean

    file = str(path)
    if not path.is_file():
        hint = None
        if path.parent.is_dir():
            hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")])
        raise SpecError("the spec file does not exist" if not path.exists() else "the spec path is not a file",
                        file=file, found=str(path), expected="a YAML spec file", hint=hint)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"the spec file cannot be read: {exc}", file=file, expected="a readable UTF-8 text file") from None


def parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple, Mark]]:
    """Parse YAML text into plain data plus a map from key path to (file, line, column)."""
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a control character: the reader refuses before parsing
        raise _reader_error(exc, text, file) from None
    try:
        node = loader.get_single_node()
        marks: dict[tuple, Mark] = {}
        data = _construct(loader, node, (), marks, file) if node is not None else None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file) from None
    finally:
        loader.dispose()
    return data, marks


_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("map", "seq", "str", "int", "float", "bool", "null", "timestamp")}
_MAX_VALUES = 100_000  # aliases of aliases can expand a few lines into billions of values


def _construct(loader: _Loader, node: yaml.Node, path: tuple, marks: dict, file: str,
               active: frozenset = frozenset()) -> Any:
    _, line, column = marks.setdefault(path, (file, node.start_mark.line + 1, node.start_mark.column + 1))
    where = dict(path=path, file=file, line=line, column=column)  # the key's position: an alias's own line
    if node.tag not in _PLAIN_TAGS:
        # a spec is plain data: refuse object construction (!!python/...) and custom tags outright
        raise SpecError(f"the YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed",
                        found=node.tag, expected="plain data: mappings, lists, strings, numbers, true/false, null",
                        **where)
    if id(node) in active:
        raise SpecError("an alias refers to a mapping or list that contains it", found="a recursive alias",
                        expected="aliases of values defined elsewhere", **where)
    if len(marks) > _MAX_VALUES:
        raise SpecError(f"the spec expands to more than {_MAX_VALUES} values", found="aliases of aliases",
                        expected="a spec of plain size", **where)
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        if not hasattr(node, "merged"):  # an aliased node is visited again, already flattened
            own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
            loader.flatten_mapping(node)  # resolves `<<: *anchor` merges: merged pairs first, then its own
            node.merged = len(node.value) - own
        out: dict[str, Any] = {}
        own_keys: set[str] = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise SpecError("mapping keys must be plain names", path=path, found=repr(key),
                                file=file, line=key_node.start_mark.line + 1, column=key_node.start_mark.column + 1)
            key = str(key)
            if i >= node.merged:  # keys merged from an anchor may be overridden; the mapping's own, not
                if key in own_keys:
                    raise SpecError(f"the key {key!r} appears twice", path=path + (key,), file=file,
                                    line=key_node.start_mark.line + 1, column=key_node.start_mark.column + 1,
                                    expected="each key once per mapping")
                own_keys.add(key)
            if key in out:  # overriding a merged value: its marks no longer describe anything
                for stale in [k for k in marks if k[: len(path) + 1] == path + (key,)]:
                    del marks[stale]
            # the key's own position is where a reader looks for a wrong key or value
            marks[path + (key,)] = (file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _construct(loader, value_node, path + (key,), marks, file, active)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, path + (i,), marks, file, active) for i, item in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    if isinstance(value, (bytes, bytearray)) or type(value).__module__ == "datetime":
        # YAML timestamps and binary have no place in a spec; treat them as the text written
        return str(node.value)
    return value



# --------------------------------------------------------------------------- source and overrides
@dataclass(frozen=True)
class Source:
    """Where a spec came from: the file (or None) and the mark of every key path."""

    file: str | None = None
    marks: Mapping[tuple, Mark] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.file).resolve().parent if self.file and not self.file.startswith("<") else Path.cwd()

    def locate(self, path: Sequence) -> Mark:
        path = tuple(path)
        while True:
            if path in self.marks:
                return self.marks[path]
            if not path:
                return (self.file, None, None)
            path = path[:-1]

    def origin(self, path: Sequence) -> Origin | None:
        """Where the value at `path` was written: a line of the file, or the `--set` flag that gave it."""
        file, line, column = self.locate(path)
        if isinstance(file, Origin):
            return file
        return Origin.file(file or self.file, line, column)

    def error(self, path: Sequence, problem: str, **kw: Any) -> SpecError:
        return SpecError(problem, path=path, origin=self.origin(path), **kw)


def _split_override(text: str) -> tuple[tuple, str]:
    if "=" not in text:
        raise SpecError("an override is written key.path=value", path=(), origin=Origin.flag("--set", text),
                        found=repr(text), expected="e.g. --set train.epochs=3")
    key, value = text.split("=", 1)
    parts: list = []
    for part in key.strip().split("."):
        if not part:
            raise SpecError("an override key has an empty part", origin=Origin.flag("--set", text), found=repr(key),
                            expected="dotted keys such as train.epochs or surgery.0.insert")
        parts.append(int(part) if part.isdigit() else part)
    return tuple(parts), value


def apply_overrides(data: dict, marks: dict, overrides: Sequence[str]) -> None:
    """Apply `key.path=value` overrides in place; values are YAML (so 3, 1e-4, [a, b] work).

    Missing mappings on the way are created; a list index one past the end appends
    (`--set surgery.0.insert=se --set surgery.0.at=layer4` on a spec without surgery).
    """
    for text in overrides:
        path, raw = _split_override(text)
        label = Origin.flag("--set", text)
        try:
            value, _ = parse_yaml(raw, str(label))
        except SpecError as err:
            raise SpecError("the value of an override is not valid YAML: " + err.problem.replace("this is not valid YAML: ", ""),
                            path=path, origin=label, found=repr(raw), hint=err.hint,
                            expected="a YAML value, e.g. 3, 1.0e-4, [layer3, layer4] or {type: MaxPool2d}") from None
        target: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            fresh = None if last else [] if isinstance(path[i + 1], int) else {}
            if isinstance(target, list):
                if not isinstance(part, int):
                    raise SpecError(f"{format_path(path[:i])} is a list: an override names its entries by number",
                                    path=path[:i], origin=label, found=repr(part),
                                    expected=f"an index, e.g. --set {'.'.join(map(str, path[:i]))}.0.{part}=...")
                if part > len(target):
                    raise SpecError("an override points into a list past its end", path=path[: i + 1], origin=label,
                                    found=str(part), expected=f"an index up to {len(target)} ({len(target)} appends an entry)")
                if part == len(target):
                    target.append(fresh)
                    marks[path[: i + 1]] = (label, None, None)
            elif isinstance(target, dict):
                part = str(part)
                if not last and target.get(part) is None:
                    target[part] = fresh
                    marks[path[: i + 1]] = (label, None, None)
            else:
                raise SpecError("an override goes below a value that is neither a mapping nor a list", path=path[:i],
                                origin=label, found=quote_value(target),
                                expected=f"a key path that exists, or --set {'.'.join(map(str, path[:i]))}=VALUE to replace it")
            if last:
                target[part] = value
            else:
                target = target[part]
        for key in [k for k in marks if k[: len(path)] == path]:
            del marks[key]
        marks[path] = (label, None, None)

