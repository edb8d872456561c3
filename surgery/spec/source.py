"""Where spec values come from: YAML text read into plain data with the file, line and column of
every key path (a `Source`), and `--set key.path=value` overrides applied on top.

Every later phase reports a mistake through `Source.locate`, so an error names the line the
offending value was written on, or the `--set` flag that gave it.
"""

from __future__ import annotations

import codecs
import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..errors import Origin, SpecError, format_path, quote_value, shorten

Mark = tuple  # (file, line, column)


# --------------------------------------------------------------------------- limits
# A spec is a page of settings. These bounds sit far above any real one and far below what makes
# PyYAML, jsonschema or Python's stack give out: hostile input gets a located SpecError in
# milliseconds instead of a minutes-long hang, a MemoryError or a RecursionError traceback.
_MAX_FILE_BYTES = 1 << 20  # 1 MiB of spec file
_MAX_OVERRIDE_CHARS = 1 << 16  # one --set flag
_MAX_DEPTH = 64  # lists and mappings inside one another, aliases expanded
_MAX_VALUES = 100_000  # aliases of aliases can expand a few lines into billions of values
_MAX_BYTES = 8 << 20  # ... or one long string, repeated through aliases, into gigabytes of text


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n:,} bytes"


# --------------------------------------------------------------------------- YAML with marks
class _TooDeep(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(f"nested deeper than {_MAX_DEPTH} levels")
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """Safe YAML (no object construction) that also reads 1e-3 as a float, as users mean it,
    and refuses nesting past `_MAX_DEPTH` while composing: PyYAML's composer recurses once per
    level, so thousands of `[` would end in a RecursionError before any check on the result."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open = 0  # lists and mappings open around the node being composed
        # where each alias was written (by parent and list index or key node): the node it stands
        # for carries its anchor's position
        self.alias_marks: dict[tuple[int, Any], yaml.Mark] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if parent is not None and index is not None and self.check_event(yaml.AliasEvent):
            self.alias_marks[id(parent), index if isinstance(index, int) else id(index)] = self.peek_event().start_mark
        opens = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if opens:
            if self._open >= _MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            self._open += 1
        try:
            return super().compose_node(parent, index)
        finally:
            if opens:
                self._open -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_KEY_OR_ITEM = re.compile(r"\n[ \t]*(?:- |[A-Za-z_][\w.-]*:(?:[ \t]|$))", re.MULTILINE)


def _runaway_quote(text: str, before: yaml.Mark) -> yaml.Token | None:
    """The first quoted value, before `before`, that runs on over lines that read as keys or list
    entries: a quote left open swallows the text up to the next quote mark, the parser then
    stumbles lines later, and only the position where the quote opened says what went wrong."""
    loader = yaml.SafeLoader(text)
    tokens: list = []
    try:
        while loader.check_token():
            tokens.append(loader.get_token())
            if tokens[-1].start_mark.index > before.index:
                break
    except yaml.YAMLError:
        tokens.extend(loader.tokens)  # scanned already, not yet handed out
    finally:
        loader.dispose()
    for token in tokens:
        if token.start_mark.index > before.index:
            break
        if (
            isinstance(token, yaml.ScalarToken)
            and token.style in ("'", '"')
            and token.end_mark.line > token.start_mark.line
            and _KEY_OR_ITEM.search(text, token.start_mark.index, token.end_mark.index)
        ):
            return token
    return None


def _yaml_error(exc: yaml.YAMLError, file: str, text: str = "") -> SpecError:
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None) or ""
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    mark, hint = problem_mark or context_mark, None
    runaway = _runaway_quote(text, mark) if text and mark is not None else None
    if runaway is not None:
        end = runaway.end_mark.line + 1
        problem = (
            f"the quote opened here is never closed: the value runs on to line {end}, where the next quote mark ends it"
        )
        mark, hint = runaway.start_mark, "close the quote on the line where it opens"
    elif (
        context_mark is not None
        and ("flow" in context or "quoted" in context)
        and (problem_mark is None or problem_mark.line > context_mark.line)
    ):
        # an unclosed bracket or quote: the parser notices lines later; the culprit is where it opened
        what = "quote" if "quoted" in context else "bracket"
        at = f" (line {problem_mark.line + 1})" if problem_mark is not None else ""
        problem, mark = f"the {what} opened here is never closed: {problem}{at}", context_mark
    elif "'\\t'" in problem or "\t" in problem:
        hint = "indent with spaces: YAML does not allow tabs"
    elif "expected alphabetic or numeric character" in problem or "cannot start any token" in problem:
        hint = (
            "YAML reads a value that starts with *, &, !, @ or ` as syntax: quote it, e.g. params: '*' or at: '@head'"
        )
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
    return SpecError(
        f"this is not valid YAML: the character {exc.character!r} is not allowed",
        file=file,
        line=before.count("\n") + 1,
        column=len(before) - before.rfind("\n"),
        expected="printable text",
        hint="remove the control character (often pasted from a terminal)",
    )


def read_spec_text(path: Path, kind: str = "spec") -> str:
    """The text of a spec file (or, `kind`, a sweep file); a located SpecError when it is missing,
    unreadable, larger than `_MAX_FILE_BYTES` (checked before reading it) or not UTF-8."""
    from ..errors import did_you_mean
    from ..files import PATH_PROBLEMS, not_regular, open_regular, problem

    file = shorten(path, 300)
    why = not_regular(path)
    if why is not None:  # a named pipe or a device would block the read, or never end
        hint = None
        if why == "no such file" and not_regular(path.parent) == "a folder":
            hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")])
        raise SpecError(
            problem(kind, why, f"the {kind} path is not a file"),
            file=file,
            found=file if why in ("no such file", *PATH_PROBLEMS) else f"{file} ({why})",
            expected=f"a YAML {kind} file",
            hint=hint,
        )
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size <= _MAX_FILE_BYTES:
                raw = f.read(_MAX_FILE_BYTES + 1)  # the file may have grown since stat
                size = len(raw)
    except OSError as exc:
        raise SpecError(
            f"the {kind} file cannot be read: {exc}", file=file, expected="a readable UTF-8 text file"
        ) from None
    if size > _MAX_FILE_BYTES:
        raise SpecError(
            f"the {kind} file is larger than {_size(_MAX_FILE_BYTES)}",
            file=file,
            found=f"{size:,} bytes",
            expected=f"a YAML {kind} of at most {_size(_MAX_FILE_BYTES)}",
            hint=f"is this the right file? A {kind} file is a page of settings",
        )
    return decode_spec(raw, file)


_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: FF FE starts both
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _wide_encoding(raw: bytes) -> str | None:
    """UTF-16 or UTF-32 written without a byte-order mark, told by its zero bytes: mostly ASCII
    text in UTF-16 has a zero in every other byte, in UTF-32 three zeros in every four."""
    sample = raw[:4096]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    zeros = [sample[i::4].count(0) / len(sample[i::4]) for i in range(4)]
    for name, pattern in (
        ("UTF-32", (0, 1, 1, 1)),
        ("UTF-32", (1, 1, 1, 0)),
        ("UTF-16", (0, 1, 0, 1)),
        ("UTF-16", (1, 0, 1, 0)),
    ):
        if all(z >= 0.6 if want else z <= 0.1 for z, want in zip(zeros, pattern)):
            return name
    return None


def _byte_position(raw: bytes, index: int) -> tuple[int, int]:
    """Line and column (1-based, in characters) of the byte at `index`; the bytes before it are UTF-8."""
    start = raw.rfind(b"\n", 0, index) + 1
    before = raw[start:index].decode("utf-8", errors="replace")
    if start == 0:
        before = before.removeprefix("\ufeff")
    return raw.count(b"\n", 0, index) + 1, len(before) + 1


def decode_spec(raw: bytes, file: str) -> str:
    """Spec bytes as text: UTF-8 (a UTF-8 byte-order mark is fine); anything else is a SpecError
    at the first byte that is not, naming UTF-16 and UTF-32 when that is what the file is."""
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise SpecError(
                f"this file is {name} (it starts with a {name} byte-order mark); save it as UTF-8",
                file=file,
                line=1,
                column=1,
                found=f"the bytes {bom.hex(' ').upper()}",
                expected="a UTF-8 text file",
                hint=f"in most editors: Save As, encoding UTF-8; or iconv -f {name} -t UTF-8",
            )
    wide = _wide_encoding(raw)
    if wide is not None:
        line, column = _byte_position(raw, raw.index(b"\x00"))
        raise SpecError(
            f"this file looks like {wide} without a byte-order mark (it is full of zero bytes); save it as UTF-8",
            file=file,
            line=line,
            column=column,
            found="the byte 0x00",
            expected="a UTF-8 text file",
            hint=f"iconv -f {wide} -t UTF-8",
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        line, column = _byte_position(raw, exc.start)
        latin = bytes([bad]).decode("cp1252", errors="replace")
        raise SpecError(
            f"this file is not UTF-8: the byte 0x{bad:02X} cannot start or continue a UTF-8 character",
            file=file,
            line=line,
            column=column,
            found=f"the byte 0x{bad:02X}",
            expected="a UTF-8 text file",
            hint=f"save the file as UTF-8 (0x{bad:02X} is {latin!r} in Latin-1/Windows-1252, a common cause)"
            if latin.isprintable() and latin != "\ufffd"
            else "save the file as UTF-8",
        ) from None


def parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple, Mark]]:
    """Parse YAML text into plain data plus a map from key path to (file, line, column)."""
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a control character: the reader refuses before parsing
        raise _reader_error(exc, text, file) from None
    try:
        node = loader.get_single_node()
        marks: dict[tuple, Mark] = {}
        data = _construct(loader, node, (), marks, file, _Budget()) if node is not None else None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, file) from None
    except _TooDeep as exc:
        raise _too_deep(file, exc.mark.line + 1, exc.mark.column + 1) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, text) from None
    except RecursionError:  # the limits above should make this unreachable; a traceback would be worse
        mark = loader.get_mark()
        raise _too_deep(
            file,
            mark.line + 1,
            mark.column + 1,
            problem="the spec nests lists and mappings too many levels deep to read",
        ) from None
    finally:
        loader.dispose()
    return data, marks


def _too_deep(
    file: str, line: int | None, column: int | None, path: tuple = (), problem: str | None = None
) -> SpecError:
    problem = problem or f"the spec nests lists and mappings more than {_MAX_DEPTH} levels deep"
    return SpecError(
        problem,
        path=path,
        file=file,
        line=line,
        column=column,
        found="the list or mapping that starts here",
        expected=f"at most {_MAX_DEPTH} levels of lists and mappings inside one another",
    )


_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("map", "seq", "str", "int", "float", "bool", "null", "timestamp")}


@dataclass
class _Budget:
    """What a document has expanded to so far, aliases counted every time they are used."""

    values: int = 0
    bytes: int = 0

    def spend(self, node: yaml.Node, where: dict) -> None:
        self.values += 1
        if isinstance(node, yaml.ScalarNode):
            self.bytes += len(node.value)
        if self.values > _MAX_VALUES:
            raise SpecError(
                f"the spec expands to more than {_MAX_VALUES} values",
                found="aliases of aliases",
                expected="a spec of plain size",
                **where,
            )
        if self.bytes > _MAX_BYTES:
            raise SpecError(
                f"the spec expands to more than {_size(_MAX_BYTES)} of text",
                found="a long value used through many aliases",
                expected="a spec of plain size",
                **where,
            )


def _merged_pairs(node: yaml.MappingNode, memo: dict) -> int:
    """How many pairs `flatten_mapping` would make of `node`: before PyYAML 6.0.3 it copies every
    merged pair, so merges of merges grow exponentially before any value is constructed."""
    if id(node) not in memo:
        memo[id(node)] = 0  # a merge cycle counts once
        total = 0
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                total += 1
            elif isinstance(value_node, yaml.MappingNode):
                total += _merged_pairs(value_node, memo)
            elif isinstance(value_node, yaml.SequenceNode):
                total += sum(_merged_pairs(n, memo) for n in value_node.value if isinstance(n, yaml.MappingNode))
            if total > _MAX_VALUES:
                break
        memo[id(node)] = total
    return memo[id(node)]


def _scalar(loader: _Loader, node: yaml.ScalarNode, where: dict) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, OverflowError):
        if node.tag == "tag:yaml.org,2002:timestamp":  # 2024-13-45 is no date: the text as written
            return str(node.value)
        # Python refuses to read integers of more than 4,300 digits (sys.int_max_str_digits)
        raise SpecError(
            f"the number {shorten(node.value, 24)} is too long to read",
            found=f"a number of {len(node.value):,} characters",
            expected="a number of plain size (Python reads integers of up to 4,300 digits)",
            **where,
        ) from None


def _construct(
    loader: _Loader,
    node: yaml.Node,
    path: tuple,
    marks: dict,
    file: str,
    budget: _Budget,
    active: frozenset = frozenset(),
    site: dict | None = None,
) -> Any:
    """Plain data from `node`. `site`: where the outermost alias on the way here was used; a spec
    that expands too far is reported there, not deep inside the anchor it repeats."""
    _, line, column = marks.setdefault(path, (file, node.start_mark.line + 1, node.start_mark.column + 1))
    where = dict(path=path, file=file, line=line, column=column)  # the key's position: an alias's own line
    # --- refuse what a spec cannot hold: tags, recursive aliases, too many values, too deep
    _check_plain(node, active, where)
    budget.spend(node, site or where)
    if isinstance(node, yaml.CollectionNode) and len(path) >= _MAX_DEPTH:  # nested deeper through aliases
        raise _too_deep(file, line, column, path)
    active = active | {id(node)}
    # --- build it: a mapping, a list or a scalar
    if isinstance(node, yaml.MappingNode):
        return _construct_mapping(loader, node, path, marks, file, budget, active, site, where)
    if isinstance(node, yaml.SequenceNode):
        return _construct_sequence(loader, node, path, marks, file, budget, active, site)
    value = _scalar(loader, node, where)
    if isinstance(value, (bytes, bytearray)) or type(value).__module__ == "datetime":
        # YAML timestamps and binary have no place in a spec; treat them as the text written
        return str(node.value)
    return value


def _check_plain(node: yaml.Node, active: frozenset, where: dict) -> None:
    """A node of plain data (no tag beyond YAML's own), not an alias of a mapping or list around it."""
    if node.tag not in _PLAIN_TAGS:
        # a spec is plain data: refuse object construction (!!python/...) and custom tags outright
        raise SpecError(
            f"the YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed",
            found=node.tag,
            expected="plain data: mappings, lists, strings, numbers, true/false, null",
            **where,
        )
    if id(node) in active:
        raise SpecError(
            "an alias refers to a mapping or list that contains it",
            found="a recursive alias",
            expected="aliases of values defined elsewhere",
            **where,
        )


def _construct_mapping(
    loader: _Loader,
    node: yaml.MappingNode,
    path: tuple,
    marks: dict,
    file: str,
    budget: _Budget,
    active: frozenset,
    site: dict | None,
    where: dict,
) -> dict[str, Any]:
    """A mapping's plain data: merges resolved, keys plain names, each of its own keys written once."""
    _flatten_merges(loader, node, where)
    out: dict[str, Any] = {}
    own_keys: set[str] = set()
    for i, (key_node, value_node) in enumerate(node.value):
        at_key = dict(path=path, file=file, line=key_node.start_mark.line + 1, column=key_node.start_mark.column + 1)
        key = _mapping_key(loader, key_node, budget, site or at_key, at_key)
        if i >= node.merged:  # keys merged from an anchor may be overridden; the mapping's own, not
            if key in own_keys:
                raise SpecError(
                    f"the key {key!r} appears twice",
                    path=path + (key,),
                    file=file,
                    line=key_node.start_mark.line + 1,
                    column=key_node.start_mark.column + 1,
                    expected="each key once per mapping",
                )
            own_keys.add(key)
        if key in out:  # overriding a merged value: its marks no longer describe anything
            for stale in [k for k in marks if k[: len(path) + 1] == path + (key,)]:
                del marks[stale]
        # the key's own position is where a reader looks for a wrong key or value
        marks[path + (key,)] = (file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        inner = site
        if inner is None and (id(node), id(key_node)) in loader.alias_marks:
            inner = dict(at_key, path=path + (key,))
        out[key] = _construct(loader, value_node, path + (key,), marks, file, budget, active, inner)
    return out


def _flatten_merges(loader: _Loader, node: yaml.MappingNode, where: dict) -> None:
    """Resolve `<<: *anchor` merges in place (merged pairs first, then its own), counting them first;
    `node.merged` is how many pairs came from merges."""
    if not hasattr(node, "merged"):  # an aliased node is visited again, already flattened
        if _merged_pairs(node, {}) > _MAX_VALUES:
            raise SpecError(
                f"the spec expands to more than {_MAX_VALUES} values",
                found="merges of merges (<<: *a)",
                expected="a spec of plain size",
                **where,
            )
        own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merges: merged pairs first, then its own
        node.merged = len(node.value) - own


def _mapping_key(loader: _Loader, key_node: yaml.Node, budget: _Budget, site: dict, at_key: dict) -> str:
    """A mapping key as the plain name it must be (a scalar of a plain tag), counted against the budget."""
    if not isinstance(key_node, yaml.ScalarNode):
        # refused before it is built: a list of aliases as a key escapes every count below
        raise SpecError(
            "mapping keys must be plain names",
            found="a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping",
            expected="a name or a number, e.g. epochs or 0",
            **at_key,
        )
    if key_node.tag not in _PLAIN_TAGS:
        raise SpecError(
            f"the YAML tag {key_node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed",
            found=key_node.tag,
            expected="a plain name",
            **at_key,
        )
    budget.spend(key_node, site)
    key = _scalar(loader, key_node, at_key)
    if not isinstance(key, (str, int, float, bool)) or key is None:
        raise SpecError("mapping keys must be plain names", found=repr(key), **at_key)
    return str(key)


def _construct_sequence(
    loader: _Loader,
    node: yaml.SequenceNode,
    path: tuple,
    marks: dict,
    file: str,
    budget: _Budget,
    active: frozenset,
    site: dict | None,
) -> list[Any]:
    """A list's plain data; an item written as an alias is marked (and, outermost, reported) where the alias is."""
    items = []
    for i, item in enumerate(node.value):
        inner, alias = site, loader.alias_marks.get((id(node), i))
        if alias is not None:
            _, line, column = marks.setdefault(path + (i,), (file, alias.line + 1, alias.column + 1))
            inner = site or dict(path=path + (i,), file=file, line=line, column=column)
        items.append(_construct(loader, item, path + (i,), marks, file, budget, active, inner))
    return items


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


def _flag(text: str) -> Origin:
    """The flag an override came from, cut short enough to print in an error's first line."""
    return Origin.flag("--set", text if len(text) <= 200 else text[:197] + "...")


_INDEX = re.compile(r"\[([0-9]+)\]")


def name_from_file(path: Path, default: str) -> str:
    """The name a spec or sweep file gives its run or sweep when it sets no `name:`: its file
    name without the suffix, with every character a name cannot hold made '-' (schema.json's
    `$defs/name`), or `default` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", Path(path).stem).lstrip(".-_+") or default


def parse_key_path(key: str) -> tuple | None:
    """``surgery.0.at`` (or ``surgery[0].at``) -> ("surgery", 0, "at"); None when a part is empty."""
    parts: list = []
    for part in _INDEX.sub(r".\1", key.strip()).split("."):
        if not part:
            return None
        parts.append(int(part) if part.isdigit() else part)
    return tuple(parts)


def _split_override(text: str) -> tuple[tuple, str]:
    if "=" not in text:
        raise SpecError(
            "an override is written key.path=value",
            path=(),
            origin=_flag(text),
            found=repr(text),
            expected="e.g. --set train.epochs=3",
        )
    key, value = text.split("=", 1)
    path = parse_key_path(key)
    if path is None:
        raise SpecError(
            "an override key has an empty part",
            origin=_flag(text),
            found=repr(key),
            expected="dotted keys such as train.epochs or surgery.0.insert",
        )
    return path, value


@dataclass(frozen=True)
class Override:
    """A value already parsed, for a key path, and where it was written: a sweep file's axis or
    `set:` line, so an error in the value names that line rather than the spec's."""

    path: tuple
    value: Any
    origin: Origin


def apply_overrides(data: dict, marks: dict, overrides: Sequence[str | Override]) -> None:
    """Apply `key.path=value` overrides (or parsed `Override`s) in place; values are YAML (so 3,
    1e-4, [a, b] work).

    Missing mappings on the way are created; a list index one past the end appends
    (`--set surgery.0.insert=se --set surgery.0.at=layer4` on a spec without surgery).
    """
    for item in overrides:
        if isinstance(item, Override):
            set_value(data, marks, item.path, copy.deepcopy(item.value), item.origin)
            continue
        text = item
        if len(text) > _MAX_OVERRIDE_CHARS:
            raise SpecError(
                f"an override is longer than {_MAX_OVERRIDE_CHARS:,} characters",
                origin=_flag(text),
                found=f"{len(text):,} characters",
                expected="key.path=value of a few words",
                hint="write long values into the spec file",
            )
        path, raw = _split_override(text)
        label = _flag(text)
        try:
            value, _ = parse_yaml(raw, str(label))
        except SpecError as err:
            raise SpecError(
                "the value of an override is not valid YAML: " + err.problem.replace("this is not valid YAML: ", ""),
                path=path,
                origin=label,
                found=repr(raw),
                hint=err.hint,
                expected="a YAML value, e.g. 3, 1.0e-4, [layer3, layer4] or {type: MaxPool2d}",
            ) from None
        set_value(data, marks, path, value, label)


def set_value(data: dict, marks: dict, path: tuple, value: Any, label: Origin) -> None:
    """Put `value` at `path` in `data` and mark it (and any mapping or list entry made on the way)
    as coming from `label`."""
    flag = label.kind == "flag"

    def example(at: tuple, rest: str) -> str:
        return f"{'--set ' if flag else ''}{'.'.join(map(str, at))}{rest}"

    target: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        fresh = None if last else [] if isinstance(path[i + 1], int) else {}
        if isinstance(target, list):
            if not isinstance(part, int):
                raise SpecError(
                    f"{format_path(path[:i])} is a list: an override names its entries by number",
                    path=path[:i],
                    origin=label,
                    found=repr(part),
                    expected=f"an index, e.g. {example(path[:i], f'.0.{part}=...')}",
                )
            if part > len(target):
                raise SpecError(
                    "an override points into a list past its end",
                    path=path[: i + 1],
                    origin=label,
                    found=str(part),
                    expected=f"an index up to {len(target)} ({len(target)} appends an entry)",
                )
            if part == len(target):
                target.append(fresh)
                marks[path[: i + 1]] = (label, None, None)
        elif isinstance(target, dict):
            part = str(part)  # `lr.10` names the key "10" of a mapping: marks must say so too
            path = path[:i] + (part,) + path[i + 1 :]
            if not last and target.get(part) is None:
                target[part] = fresh
                marks[path[: i + 1]] = (label, None, None)
        else:
            raise SpecError(
                "an override goes below a value that is neither a mapping nor a list",
                path=path[:i],
                origin=label,
                found=quote_value(target),
                expected=f"a key path that exists, or {example(path[:i], '=VALUE')} to replace it",
            )
        if last:
            target[part] = value
        else:
            target = target[part]
    for key in [k for k in marks if k[: len(path)] == path]:
        del marks[key]
    marks[path] = (label, None, None)
