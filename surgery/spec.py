"""Load a spec: YAML with line marks -> JSON Schema -> defaults -> frozen dataclasses.

`load_spec` is the only place where raw dicts become typed objects; every later phase takes a
`Spec`. Each `Spec` keeps its `Source`, so semantic checks against the real model
(`build`) still report the file, line and key path of the value they reject.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import SpecError, close_matches, did_you_mean, format_path

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


# --------------------------------------------------------------------------- schema
@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema (draft 2020-12) every spec is validated against."""
    return json.loads(resources.files("surgery").joinpath("schema.json").read_text())


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema())
    return cls(schema())


def _deref(node: Any) -> dict:
    root = schema()
    node = node if isinstance(node, dict) else {}
    while "$ref" in node:
        node = root["$defs"][node["$ref"].split("/")[-1]]
    return node


_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
          "number": "a number", "boolean": "true or false", "null": "null"}


def _describe(node: Any, brief: bool = False) -> str:
    """Words for what a schema node accepts (`brief`: without its description)."""
    sub = _deref(node)
    note = f" ({sub['description']})" if sub.get("description") and not brief else ""
    if "enum" in sub:
        return "one of " + ", ".join(json.dumps(v) for v in sub["enum"]) + note
    if "const" in sub:
        return json.dumps(sub["const"]) + note
    if "oneOf" in sub:
        return " or ".join(_describe(alt, brief=True) for alt in sub["oneOf"]) + note
    kind = sub.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    text = " or ".join(_WORDS.get(k, k) for k in kinds) or "a value"
    limits = []
    for word, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if word in sub:
            limits.append(f"{op} {sub[word]}")
    if limits:
        text += " " + " and ".join(limits)
    return text + note


_KINDS = ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"), (dict, "a mapping"),
          (list, "a list"))  # bool before int: True is an int too


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    return next((word for cls, word in _KINDS if isinstance(value, cls)), type(value).__name__)


def _choices(node: Any) -> list:
    sub = _deref(node)
    if "enum" in sub:
        return list(sub["enum"])
    if "const" in sub:
        return [sub["const"]]
    return [c for alt in sub.get("oneOf", []) for c in _choices(alt)]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# jsonschema reports a oneOf failure as one error holding every alternative's errors. A value
# of the right kind for one alternative (a mapping where a number or a mapping is allowed) is
# best told what is wrong inside that alternative; a value of no accepted kind, what kinds there are.
_KIND_ERRORS = ("type", "enum", "const")


def _alternatives(err) -> list[list]:
    alts: dict[Any, list] = {}
    for e in err.context:
        alts.setdefault(e.relative_schema_path[0], []).append(e)
    return list(alts.values())


def _fits(err) -> bool:
    """Is the value of a kind this schema accepts (so the error is about its content)?"""
    if err.relative_path:
        return True
    if err.validator in _KIND_ERRORS:
        return False
    if err.validator in ("oneOf", "anyOf") and err.context:
        return any(all(_fits(e) for e in alt) for alt in _alternatives(err))
    return True


def _where(err) -> tuple:
    """The key path an error is about: an unknown key's own path, a bad map key's own path."""
    path = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _deref(err.schema).get("properties", {})
        extra = [k for k in err.instance if k not in allowed]
        if extra:
            return path + (extra[0],)
    if "propertyNames" in err.relative_schema_path and isinstance(err.instance, str):
        return path + (err.instance,)
    return path


def _first(errors: Sequence, source: "Source"):
    """The error a reader meets first in the file; a missing key only when nothing else is wrong."""
    def order(err) -> tuple:
        _, line, column = source.locate(_where(err))
        return (err.validator == "required", line if line is not None else float("inf"), column or 0)

    return min(errors, key=order)


def _innermost(err, source: "Source"):
    while err.validator in ("oneOf", "anyOf") and err.context:
        fitting = [alt for alt in _alternatives(err) if all(_fits(e) for e in alt)]
        if not fitting:
            break
        err = _first(min(fitting, key=len), source)
    return err


def _schema_error(err, source: "Source") -> SpecError:
    """Turn one jsonschema error into a located, worded SpecError."""
    path = tuple(err.absolute_path)
    node = _deref(err.schema)
    label = next((p for p in reversed(path) if isinstance(p, str)), "the spec")
    if path and isinstance(path[-1], int):
        label = f"an entry of {label}"
    if err.validator == "additionalProperties":
        allowed = sorted(node.get("properties", {}))
        where = _where(err)
        key = where[-1]
        return source.error(where, f"unknown key {key!r}", found=repr(key),
                            expected="one of " + ", ".join(allowed), hint=did_you_mean(key, allowed))
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        key = missing[0] if missing else str(err.validator_value)
        return source.error(path, f"the required key {key!r} is missing",
                            expected=f"`{key}:` with " + _describe(node.get("properties", {}).get(key, {})))
    if "propertyNames" in err.relative_schema_path:
        return source.error(_where(err), f"{err.instance!r} is not an epoch: the keys of a learning-rate map are epochs",
                            found=_short(err.instance), expected="a mapping like {0: 1.0e-4, 10: 1.0e-5}")
    choices = [c for c in _choices(node) if isinstance(c, str)]
    if err.validator in ("enum", "const") or (err.validator == "oneOf" and isinstance(err.instance, str) and choices):
        hint = did_you_mean(err.instance, choices) if isinstance(err.instance, str) else None
        return source.error(path, f"{_short(err.instance)} is not an accepted value",
                            found=_short(err.instance), expected=_describe(node), hint=hint)
    if err.validator == "pattern" and path and path[-1] == "backbone":
        value = str(err.instance)
        prefix, colon, _ = value.partition(":")
        if colon:
            return source.error(path, f"unknown backbone source {prefix!r}", found=_short(value),
                                expected="torchvision:<name> or timm:<name>, e.g. torchvision:resnet18 or timm:efficientnet_b0",
                                hint=did_you_mean(prefix, ["torchvision", "timm"]))
        return source.error(path, "a backbone is named <source>:<name>", found=_short(value),
                            expected="torchvision:<name> or timm:<name>, e.g. torchvision:resnet18 or timm:efficientnet_b0",
                            hint=f"write torchvision:{value} or timm:{value}")
    if err.validator == "pattern":
        noun = {"at": "module pattern", "params": "parameter pattern", "insert": "module name"}.get(label, label)
        return source.error(path, f"{_short(err.instance)} is not a valid {noun}", found=_short(err.instance),
                            expected=node.get("description") or f"text matching {err.validator_value}")
    if err.validator in ("type", "oneOf", "anyOf"):
        return source.error(path, f"{label} takes {_describe(node, brief=True)}, not {_kind_of(err.instance)}",
                            found=_short(err.instance), expected=_describe(node))
    if err.validator in ("minItems", "maxItems", "minProperties"):
        n = err.validator_value
        what = {"minItems": f"at least {n} item", "maxItems": f"at most {n} item",
                "minProperties": f"at least {n} key"}[err.validator] + ("s" if n != 1 else "")
        return source.error(path, f"{label} needs {what}", found=_short(err.instance), expected=_describe(node))
    return source.error(path, err.message, found=_short(err.instance), expected=_describe(node))


def validate(data: Any, source: "Source") -> None:
    """Check `data` against the schema; raise the first error in the file, located."""
    if not isinstance(data, dict):
        raise source.error((), "a spec is a YAML mapping", found=_short(data),
                           expected="a mapping with at least `model: {backbone: ...}`")
    errors = [_innermost(e, source) for e in _validator().iter_errors(data)]
    if errors:
        raise _schema_error(_first(errors, source), source)


# --------------------------------------------------------------------------- defaults
def fill_defaults(data: dict) -> dict:
    """A deep copy of a valid spec with every default of the schema filled in."""

    def walk(value: Any, node: dict) -> Any:
        node = _deref(node)
        if isinstance(value, dict):
            props = node.get("properties")
            if props is None:
                for alt in node.get("oneOf", []):
                    if "properties" in _deref(alt):
                        props = _deref(alt)["properties"]
            if props:
                for key, sub in props.items():
                    if key not in value and "default" in sub:
                        value[key] = copy.deepcopy(sub["default"])
                for key in list(value):
                    if key in props:
                        value[key] = walk(value[key], props[key])
        elif isinstance(value, list) and "items" in node:
            return [walk(v, node["items"]) for v in value]
        return value

    return walk(copy.deepcopy(data), schema())


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

    def error(self, path: Sequence, problem: str, **kw: Any) -> SpecError:
        file, line, column = self.locate(path)
        return SpecError(problem, path=path, file=file or self.file, line=line, column=column, **kw)


def _split_override(text: str) -> tuple[tuple, str]:
    if "=" not in text:
        raise SpecError("an override is written key.path=value", path=(), file=f"--set {text}",
                        found=repr(text), expected="e.g. --set train.epochs=3")
    key, value = text.split("=", 1)
    parts: list = []
    for part in key.strip().split("."):
        if not part:
            raise SpecError("an override key has an empty part", file=f"--set {text}", found=repr(key),
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
        label = f"--set {text}"
        try:
            value, _ = parse_yaml(raw, label)
        except SpecError as err:
            raise SpecError("the value of an override is not valid YAML: " + err.problem.replace("this is not valid YAML: ", ""),
                            path=path, file=label, found=repr(raw), hint=err.hint,
                            expected="a YAML value, e.g. 3, 1.0e-4, [layer3, layer4] or {type: MaxPool2d}") from None
        target: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            fresh = None if last else [] if isinstance(path[i + 1], int) else {}
            if isinstance(target, list):
                if not isinstance(part, int):
                    raise SpecError(f"{format_path(path[:i])} is a list: an override names its entries by number",
                                    path=path[:i], file=label, found=repr(part),
                                    expected=f"an index, e.g. --set {'.'.join(map(str, path[:i]))}.0.{part}=...")
                if part > len(target):
                    raise SpecError("an override points into a list past its end", path=path[: i + 1], file=label,
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
                                file=label, found=_short(target),
                                expected=f"a key path that exists, or --set {'.'.join(map(str, path[:i]))}=VALUE to replace it")
            if last:
                target[part] = value
            else:
                target = target[part]
        for key in [k for k in marks if k[: len(path)] == path]:
            del marks[key]
        marks[path] = (label, None, None)


# --------------------------------------------------------------------------- typed spec
@dataclass(frozen=True)
class Selector:
    """One pattern: a dotted glob, a named selector ('@inserted', '@head') or a module type."""

    pattern: str | None
    type: str | None
    where: tuple  # key path in the spec

    def __str__(self) -> str:
        return self.pattern if self.pattern is not None else f"{{type: {self.type}}}"


@dataclass(frozen=True)
class ModelSpec:
    backbone: str
    pretrained: bool | str
    num_classes: int | None
    args: Mapping[str, Any]
    key_map: str | Mapping[str, str] | None
    checkpoint_key: str | None
    reset_head: bool = False

    @property
    def source(self) -> str:
        return self.backbone.split(":", 1)[0]

    @property
    def arch(self) -> str:
        return self.backbone.split(":", 1)[1]


@dataclass(frozen=True)
class InsertSpec:
    insert: str
    at: tuple[Selector, ...]
    position: str
    init: str
    args: Mapping[str, Any]
    index: int  # position in `surgery`, for errors


@dataclass(frozen=True)
class GroupSpec:
    name: str
    params: tuple[Selector, ...]
    lr: tuple[tuple[int, float], ...]  # piecewise constant, sorted, starts at epoch 0
    unfreeze_at: int | None  # None: never
    weight_decay: float | None
    decay_norm_and_bias: bool
    norm: str
    warmup_epochs: int
    index: int

    def base_lr(self, epoch: int) -> float:
        value = self.lr[0][1]
        for start, lr in self.lr:
            if epoch >= start:
                value = lr
        return value

    def trainable(self, epoch: int) -> bool:
        return self.unfreeze_at is not None and epoch >= self.unfreeze_at


@dataclass(frozen=True)
class Spec:
    """A validated spec with every default filled in. `raw` is that same content as plain data."""

    name: str
    seed: int
    model: ModelSpec
    surgery: tuple[InsertSpec, ...]
    groups: tuple[GroupSpec, ...]
    train: Mapping[str, Any]
    data: Mapping[str, Any]
    raw: Mapping[str, Any]
    source: Source
    default_groups: bool  # True when the spec declared no groups
    warnings: tuple[str, ...] = ()  # located notes on settings that are legal but probably unintended

    def error(self, path: Sequence, problem: str, **kw: Any) -> SpecError:
        return self.source.error(path, problem, **kw)

    def resolve_path(self, value: str, key: Sequence = ()) -> Path:
        """A path written in the spec: relative to the spec's folder, or to the working
        directory when it was given on the command line (`--set key=path`)."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        file = self.source.locate(tuple(key))[0] if key else None
        base = Path.cwd() if file and str(file).startswith("--set") else self.source.folder
        return base / p

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(json.dumps(self.raw)), sort_keys=False, allow_unicode=True)


def _selectors(value: Any, where: tuple) -> tuple[Selector, ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        at = where + (i,) if isinstance(value, list) else where
        if isinstance(item, dict):
            out.append(Selector(None, item["type"], at))
        else:
            out.append(Selector(item, None, at))
    return tuple(out)


def _lr(value: Any, where: tuple, source: Source) -> tuple[tuple[int, float], ...]:
    if isinstance(value, (int, float)):
        return ((0, float(value)),)
    steps = tuple(sorted((int(k), float(v)) for k, v in value.items()))
    if steps[0][0] != 0:
        raise source.error(where, "a learning-rate map must say what the lr is from epoch 0",
                           found=_short(value), expected="a first key 0, e.g. {0: 1.0e-4, 10: 1.0e-5}")
    return steps


def _typed(data: dict, source: Source) -> Spec:
    m = data["model"]
    model = ModelSpec(m["backbone"], m["pretrained"], m["num_classes"], m["args"], m["key_map"], m["checkpoint_key"], m["reset_head"])
    inserts = tuple(
        InsertSpec(s["insert"], _selectors(s["at"], ("surgery", i, "at")), s["position"], s["init"], s["args"], i)
        for i, s in enumerate(data["surgery"])
    )
    default_groups = "groups" not in data
    raw_groups = data.get("groups") or [{"name": "all", "params": "*"}]
    default_lr = data["train"]["optimizer"]["lr"]
    groups = []
    seen: dict[str, int] = {}
    for i, g in enumerate(raw_groups):
        g.setdefault("lr", default_lr)
        for key, sub in schema()["$defs"]["group"]["properties"].items():
            if key not in g and "default" in sub:
                g[key] = copy.deepcopy(sub["default"])
        if g["name"] in seen:
            raise source.error(("groups", i, "name"), f"two groups are named {g['name']!r}",
                               expected="a distinct name for each group", hint=f"the first is groups[{seen[g['name']]}]")
        seen[g["name"]] = i
        groups.append(GroupSpec(
            name=g["name"],
            params=_selectors(g["params"], ("groups", i, "params")),
            lr=_lr(g["lr"], ("groups", i, "lr"), source),
            unfreeze_at=None if g["unfreeze_at"] == "never" else int(g["unfreeze_at"]),
            weight_decay=g["weight_decay"],
            decay_norm_and_bias=g["decay_norm_and_bias"],
            norm=g["norm"],
            warmup_epochs=g["warmup_epochs"],
            index=i,
        ))
    if default_groups:
        data["groups"] = raw_groups
    return Spec(
        name=data["name"], seed=data["seed"], model=model, surgery=inserts, groups=tuple(groups),
        train=data["train"], data=data["data"], raw=data, source=source, default_groups=default_groups,
    )


def _check_cross_fields(spec: Spec) -> tuple[str, ...]:
    """Rules the schema cannot say: they relate one key to another.

    Settings that only fall outside a run shortened on purpose (`--set train.epochs=1` for a
    smoke run) are warnings, not errors: a group unfreezing after the last epoch just never
    trains in that run. Returns the warnings, each with its location.
    """
    epochs = spec.train["epochs"]
    warnings: list[str] = []

    def warn(path: tuple, text: str) -> None:
        file, line, column = spec.source.locate(path)
        where = f"{file or '<spec>'}" + (f":{line}" if line else "")
        warnings.append(f"{where}: {format_path(path)}: {text}")

    for g in spec.groups:
        where = ("groups", g.index)
        if g.unfreeze_at is not None and g.unfreeze_at >= epochs:
            warn(where + ("unfreeze_at",), f"group {g.name!r} unfreezes at epoch {g.unfreeze_at}, after the last "
                 f"epoch ({epochs - 1}): it stays frozen for this whole run")
        for start, _ in g.lr:
            if start >= epochs:
                warn(where + ("lr",), f"the learning-rate map of {g.name!r} names epoch {start}, past the last "
                     f"epoch ({epochs - 1}): that step never comes")
    if all(g.unfreeze_at is None for g in spec.groups):
        raise spec.error(("groups",), "no group ever trains: every group has unfreeze_at: never",
                         expected="at least one group with an unfreeze epoch")
    if all(g.unfreeze_at is None or g.unfreeze_at >= epochs for g in spec.groups):
        warn(("groups",), f"no group trains within the {epochs} epochs of this run")
    sched = spec.train["scheduler"]
    for i, m in enumerate(sched["milestones"]):
        if m >= epochs:
            warn(("train", "scheduler", "milestones", i), f"milestone {m} lies past the last epoch ({epochs - 1})")
    if sched["warmup_epochs"] >= epochs:
        warn(("train", "scheduler", "warmup_epochs"), f"the warm-up ({sched['warmup_epochs']} epochs) lasts the whole run")
    key_map, pretrained = spec.model.key_map, spec.model.pretrained
    if key_map and (pretrained is False or (key_map == "order" and not isinstance(pretrained, str))):
        raise spec.error(("model", "key_map"), "key_map maps the keys of a weight file, and this spec loads none",
                         found="pretrained: " + json.dumps(pretrained),
                         expected="model.pretrained set to the path of a weight file",
                         hint="remove key_map, or point model.pretrained at the file whose keys it maps")
    return tuple(warnings)


# --------------------------------------------------------------------------- entry point
def load_spec(spec: str | Path | Mapping, overrides: Sequence[str] = ()) -> Spec:
    """Load, validate and type a spec.

    Args:
        spec: a path to a YAML file, or the spec as a dict (errors then carry key paths only).
        overrides: ``key.path=value`` strings applied before validation (``--set``).

    Returns:
        The frozen `Spec`, every default filled in.

    Raises:
        SpecError: with file, line, column and key path, for anything a user can get wrong.

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}})
        >>> spec.groups[0].name
        'all'
    """
    if isinstance(spec, Mapping):
        data, marks, file, name = copy.deepcopy(dict(spec)), {}, None, "run"
    else:
        path = Path(spec)
        file = str(spec)
        if not path.is_file():
            hint = None
            if path.parent.is_dir():
                hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")])
            raise SpecError("the spec file does not exist" if not path.exists() else "the spec path is not a file",
                            file=file, found=str(path), expected="a YAML spec file", hint=hint)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"the spec file cannot be read: {exc}", file=file, expected="a readable UTF-8 text file") from None
        data, marks = parse_yaml(text, file)
        name = re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem).lstrip(".-_+") or "run"
    source = Source(file, marks)
    if data is None:
        raise SpecError("the spec is empty", file=file, line=1 if file else None, column=1 if file else None,
                        expected="a mapping with at least `model: {backbone: ...}`")
    if overrides:
        if not isinstance(data, dict):
            validate(data, source)
        apply_overrides(data, marks, overrides)
    validate(data, source)
    data = fill_defaults(data)
    data.setdefault("name", name)
    typed = _typed(data, source)
    return dataclasses.replace(typed, warnings=_check_cross_fields(typed))


def backbone_names(source: str) -> list[str]:
    """Every model name a source knows (for "did you mean" suggestions)."""
    if source == "torchvision":
        import torchvision

        return list(torchvision.models.list_models())
    import timm

    return list(timm.list_models())


__all__ = ["Spec", "ModelSpec", "InsertSpec", "GroupSpec", "Selector", "Source", "load_spec", "schema",
           "parse_yaml", "fill_defaults", "validate", "backbone_names", "format_path", "close_matches"]
