"""The JSON Schemas of specs and sweep files: validation with located, worded errors, and
defaults filled in.

One file, schema.json, holds both: its root is the spec's schema, and ``$defs/sweep_file`` the
sweep file's (`schema("sweep")` gives it a root of its own, for `surgery schema --sweep`); they
share their ``$defs``, so a name is checked by one pattern in both.

jsonschema finds what is wrong; this module says it the way a user reads it (the innermost
alternative that fits, the first error in file order, did-you-mean for names). A schema node may
carry ``x-problem``, the sentence that says what is wrong with a value it refuses (``{value}``:
the value as written); JSON Schema ignores keywords it does not know.
"""

from __future__ import annotations

import copy
import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from ..errors import SpecError, did_you_mean, quote_value
from .source import _MAX_DEPTH, Source

# --------------------------------------------------------------------------- schema
KINDS = ("spec", "sweep")
_SWEEP_ID = "https://github.com/surgery-tool/surgery/schema/sweep-v1.json"


@lru_cache(maxsize=2)
def schema(kind: str = "spec") -> dict:
    """The JSON Schema (draft 2020-12) every spec (`kind` "sweep": every sweep file) is validated against."""
    root = json.loads(resources.files("surgery.spec").joinpath("schema.json").read_text())
    if kind == "spec":
        return root
    top = root["$defs"]["sweep_file"]
    return {
        "$schema": root["$schema"],
        "$id": _SWEEP_ID,
        "title": top["title"],
        "description": top["description"],
        "$ref": "#/$defs/sweep_file",
        "$defs": root["$defs"],
    }


@lru_cache(maxsize=2)
def _validator(kind: str = "spec"):
    import jsonschema

    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema(kind))
    return cls(schema(kind))


def _deref(node: Any) -> dict:
    root = schema()
    node = node if isinstance(node, dict) else {}
    while "$ref" in node:
        node = root["$defs"][node["$ref"].split("/")[-1]]
    return node


_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


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
            limits.append(f"{op} {_number(sub[word])}")
    if limits:
        text += " " + " and ".join(limits)
    return text + note


_KINDS = (
    (bool, "true/false"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (dict, "a mapping"),
    (list, "a list"),
)  # bool before int: True is an int too


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


def _first(errors: Sequence, source: Source):
    """The error a reader meets first in the file; a missing key only when nothing else is wrong."""

    def order(err) -> tuple:
        _, line, column = source.locate(_where(err))
        return (err.validator == "required", line if line is not None else float("inf"), column or 0)

    return min(errors, key=order)


def _innermost(err, source: Source):
    while err.validator in ("oneOf", "anyOf") and err.context:
        fitting = [alt for alt in _alternatives(err) if all(_fits(e) for e in alt)]
        if not fitting:
            break
        err = _first(min(fitting, key=len), source)
    return err


_BOUNDS = {
    "minimum": "less than the minimum of",
    "exclusiveMinimum": "not above the minimum of",
    "maximum": "greater than the maximum of",
    "exclusiveMaximum": "not below the maximum of",
}


def _number(value: Any) -> str:
    """A number short enough to read: 1e+30 for an integer of 31 digits, 65,536 for one of 5."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) < 10**21 else f"{value:.3g}"
    return repr(value)


def _schema_error(err, source: Source) -> SpecError:
    """Turn one jsonschema error into a located, worded SpecError."""
    path = tuple(err.absolute_path)
    node = _deref(err.schema)
    label = next((p for p in reversed(path) if isinstance(p, str)), "the spec")
    if path and isinstance(path[-1], int):
        label = f"an entry of {label}"
    # --- the schema's own sentence; then keys: unknown, missing, not an epoch
    if "x-problem" in node and err.validator not in ("additionalProperties", "required"):
        return _word_x_problem(err, node, source)
    if err.validator == "additionalProperties":
        return _word_unknown_key(err, node, source)
    if err.validator == "required":
        return _word_missing_key(err, node, path, source)
    if "propertyNames" in err.relative_schema_path:
        return _word_epoch_key(err, source)
    # --- values: not one of the choices, not of the pattern
    choices = [c for c in _choices(node) if isinstance(c, str)]
    if err.validator in ("enum", "const") or (err.validator == "oneOf" and isinstance(err.instance, str) and choices):
        hint = did_you_mean(err.instance, choices) if isinstance(err.instance, str) else None
        return source.error(
            path,
            f"{quote_value(err.instance)} is not an accepted value",
            found=quote_value(err.instance),
            expected=_describe(node),
            hint=hint,
        )
    if err.validator == "pattern":
        return _word_pattern(err, node, path, label, source)
    # --- the wrong kind, out of bounds, too few or too many
    return _word_kind_or_size(err, node, path, label, source)


def _word_x_problem(err, node: dict, source: Source) -> SpecError:
    """The schema node's own `x-problem` sentence, with did-you-mean among its choices."""
    choices = [c for c in _choices(node) if isinstance(c, str)]
    hint = did_you_mean(err.instance, choices) if isinstance(err.instance, str) and choices else None
    problem = node["x-problem"].replace("{value}", quote_value(err.instance))
    return source.error(
        _where(err),
        problem,
        found=quote_value(err.instance),
        expected=node.get("description") if "propertyNames" in err.relative_schema_path else _describe(node),
        hint=hint,
    )


def _word_unknown_key(err, node: dict, source: Source) -> SpecError:
    """A key the mapping does not take, with did-you-mean among those it does."""
    allowed = sorted(node.get("properties", {}))
    where = _where(err)
    key = where[-1]
    return source.error(
        where,
        f"unknown key {key!r}",
        found=repr(key),
        expected="one of " + ", ".join(allowed),
        hint=did_you_mean(key, allowed),
    )


def _word_missing_key(err, node: dict, path: tuple, source: Source) -> SpecError:
    """The first required key the mapping lacks, with what it takes."""
    missing = [k for k in err.validator_value if k not in err.instance]
    key = missing[0] if missing else str(err.validator_value)
    return source.error(
        path,
        f"the required key {key!r} is missing",
        expected=f"`{key}:` with " + _describe(node.get("properties", {}).get(key, {})),
    )


def _word_epoch_key(err, source: Source) -> SpecError:
    """A key of a learning-rate map that is no epoch: past the last one, or no number at all."""
    if isinstance(err.instance, str) and err.instance.isascii() and err.instance.isdigit():
        last = _deref(schema()["$defs"]["train"]["properties"]["epochs"])["maximum"]
        return source.error(
            _where(err),
            f"epoch {err.instance} is past the last epoch a spec can have ({last})",
            found=quote_value(err.instance),
            expected=f"epochs from 0 to {last}",
        )
    return source.error(
        _where(err),
        f"{err.instance!r} is not an epoch: the keys of a learning-rate map are epochs",
        found=quote_value(err.instance),
        expected="a mapping like {0: 1.0e-4, 10: 1.0e-5}",
    )


def _word_pattern(err, node: dict, path: tuple, label: str, source: Source) -> SpecError:
    """A value its pattern refuses: a backbone name without its source, or another name."""
    if path and path[-1] == "backbone":
        value = str(err.instance)
        prefix, colon, _ = value.partition(":")
        if colon:
            return source.error(
                path,
                f"unknown backbone source {prefix!r}",
                found=quote_value(value),
                expected="torchvision:<name> or timm:<name>, e.g. torchvision:resnet18 or timm:efficientnet_b0",
                hint=did_you_mean(prefix, ["torchvision", "timm"]),
            )
        return source.error(
            path,
            "a backbone is named <source>:<name>",
            found=quote_value(value),
            expected="torchvision:<name> or timm:<name>, e.g. torchvision:resnet18 or timm:efficientnet_b0",
            hint=f"write torchvision:{value} or timm:{value}",
        )
    noun = {"at": "module pattern", "params": "parameter pattern", "insert": "module name"}.get(label, label)
    return source.error(
        path,
        f"{quote_value(err.instance)} is not a valid {noun}",
        found=quote_value(err.instance),
        expected=node.get("description") or f"text matching {err.validator_value}",
    )


def _word_kind_or_size(err, node: dict, path: tuple, label: str, source: Source) -> SpecError:
    """A value of the wrong kind, out of bounds, with too few or too many items; else jsonschema's message."""
    if err.validator in ("type", "oneOf", "anyOf"):
        return source.error(
            path,
            f"{label} takes {_describe(node, brief=True)}, not {_kind_of(err.instance)}",
            found=quote_value(err.instance),
            expected=_describe(node),
        )
    if err.validator in _BOUNDS:
        return source.error(
            path,
            f"{label} is {_number(err.instance)}, {_BOUNDS[err.validator]} {_number(err.validator_value)}",
            found=quote_value(err.instance),
            expected=_describe(node),
        )
    if err.validator in ("minItems", "maxItems", "minProperties"):
        n = err.validator_value
        what = {
            "minItems": f"at least {n} item",
            "maxItems": f"at most {n} item",
            "minProperties": f"at least {n} key",
        }[err.validator] + ("s" if n != 1 else "")
        return source.error(path, f"{label} needs {what}", found=quote_value(err.instance), expected=_describe(node))
    return source.error(path, err.message, found=quote_value(err.instance), expected=_describe(node))


def check_values(data: Any, source: Source, kind: str = "spec") -> None:
    """Every number finite and nothing nested past `_MAX_DEPTH`, anywhere in the spec (or the
    sweep file, `kind`).

    JSON Schema's `number` takes inf and nan (YAML's .inf, .nan, and 1e400, which overflows), and a
    free-form `args` mapping is not looked into at all; an infinite lr or NaN momentum would pass
    validation and wreck the first step of a run. A spec given as a dict has no parser to bound
    its depth (nor cycles); jsonschema and deepcopy recurse through it. The walk is iterative.
    """
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            written = ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
            raise source.error(
                path,
                f"this number is not finite: a {kind} takes finite numbers only"
                if written != ".nan"
                else f"this value is not a number (NaN): a {kind} takes finite numbers only",
                found=written,
                expected="a finite number",
                hint="YAML reads .inf, .nan, and numbers past about 1.8e308 (such as 1e400) as not finite",
            )
        if isinstance(value, (dict, list)):
            if len(path) >= _MAX_DEPTH:
                raise source.error(
                    path,
                    f"the {kind} nests lists and mappings more than {_MAX_DEPTH} levels deep",
                    expected=f"at most {_MAX_DEPTH} levels of lists and mappings inside one another",
                )
            items = list(value.items() if isinstance(value, dict) else enumerate(value))
            stack.extend((item, path + (key,)) for key, item in reversed(items))


_TOPS = {
    "spec": ("a spec is a YAML mapping", "a mapping with at least `model: {backbone: ...}`"),
    "sweep": ("a sweep file is a YAML mapping", "name, spec, set and sweep keys"),
}


def check_schema(data: Any, source: Source, kind: str = "spec") -> None:
    """Check `data` against the schema of a spec (or of a sweep file, `kind`); raise the first
    error in the file, located."""
    if not isinstance(data, dict):
        problem, expected = _TOPS[kind]
        raise source.error((), problem, found=quote_value(data), expected=expected)
    errors = [_innermost(e, source) for e in _validator(kind).iter_errors(data)]
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
        elif isinstance(value, float) and value.is_integer() and _integral(node):
            return int(value)  # JSON Schema's integer takes 3.0 (and 1e3); range() and DataLoader do not
        return value

    return walk(copy.deepcopy(data), schema())


def _integral(node: dict) -> bool:
    """Does this schema node take integers and no other numbers?"""
    kinds = [
        k
        for alt in [node, *map(_deref, node.get("oneOf", []))]
        for k in (alt.get("type") if isinstance(alt.get("type"), list) else [alt.get("type")])
    ]
    return "integer" in kinds and "number" not in kinds
