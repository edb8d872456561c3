"""Hostile input: mutated specs give a valid Spec or a located SpecError, never anything else.

Counts (with test_spec.py's random-text and random-dict tests, 200 each): 300 text-level
mutations and 300 structure-level mutations of the shipped specs, and 25 pattern mutations
built against a real model, 1,025 cases per run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery import SpecError, build, load_spec

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(
    p for folder in ("specs", "examples") for p in (ROOT / folder).rglob("*.yaml") if not p.name.startswith("sweep-")
)  # sweep files: tests/test_sweep.py
TEXTS = {p.name: p.read_text(encoding="utf-8") for p in SHIPPED}
RAWS = {p.name: yaml.safe_load(t) for p, t in zip(SHIPPED, TEXTS.values())}

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
    st.sampled_from(["layer9", "*", "@head", "@inserted", "cbam", "never", "timm:nope", "{type: X}"]),
)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


def _check(err: SpecError, file: str | None) -> None:
    assert err.problem
    if file is not None:
        assert err.file is not None
    assert isinstance(err.key_path, tuple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(TEXTS)), data=st.data())
def test_text_mutations_of_shipped_specs(tmp_path: Path, name: str, data) -> None:
    text = TEXTS[name]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, max(len(text) - 1, 0)))
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "swap-lines"]))
        if op == "delete":
            text = text[:i] + text[i + data.draw(st.integers(1, 8)) :]
        elif op == "insert":
            text = (
                text[:i]
                + data.draw(st.sampled_from([":", "-", "[", "{", "\t", " ", "'", "*", "&a", "!!", "\n", "0"]))
                + text[i:]
            )
        elif op == "replace":
            text = text[:i] + data.draw(st.text(max_size=3)) + text[i + 1 :]
        else:
            lines = text.splitlines()
            if len(lines) > 2:
                a = data.draw(st.integers(0, len(lines) - 1))
                b = data.draw(st.integers(0, len(lines) - 1))
                lines[a], lines[b] = lines[b], lines[a]
                text = "\n".join(lines)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as err:
        _check(err, str(path))
        assert err.line is None or 1 <= err.line <= text.count("\n") + 2


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(RAWS)), data=st.data())
def test_structure_mutations_of_shipped_specs(name: str, data) -> None:
    spec = copy.deepcopy(RAWS[name])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(spec) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = spec
        for part in path[:-1]:
            parent = parent[part]
        op = data.draw(st.sampled_from(["delete", "replace", "rename"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = data.draw(_values)
        elif isinstance(parent, dict):
            parent[str(path[-1]) + data.draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(path[-1])
    try:
        load_spec(json.loads(json.dumps(spec, default=str)))
    except SpecError as err:
        _check(err, None)
    except ValueError as err:  # json can't carry NaN keys etc.: only SpecError may come from load_spec
        assert isinstance(err, SpecError), err


BASE = {"model": {"backbone": "timm:resnet10t", "num_classes": 3}, "data": {"image_size": 32}}


@pytest.fixture(scope="module")
def _names() -> list[str]:
    built = build(load_spec(BASE))
    return [n for n, _ in built.model.named_modules() if n]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pattern_mutations_build_or_fail_located(_names: list[str], data) -> None:
    """Random (often wrong) module patterns against a real model: build, or a SpecError at the pattern."""

    def pattern() -> str:
        base = data.draw(st.sampled_from(_names))
        op = data.draw(st.sampled_from(["keep", "glob", "typo", "deeper", "junk"]))
        if op == "glob":
            return base.rsplit(".", 1)[0] + ".*" if "." in base else base[:-1] + "*"
        if op == "typo":
            i = data.draw(st.integers(0, len(base) - 1))
            return base[:i] + base[i + 1 :] or "x"
        if op == "deeper":
            return base + ".zz"
        if op == "junk":
            return data.draw(st.sampled_from(["**", "*.*.*.*.*", "[", "layer[", "?", "**.conv2"]))
        return base

    spec = copy.deepcopy(BASE)
    spec["surgery"] = [{"insert": data.draw(st.sampled_from(["cbam", "se", "eca", "cbma"])), "at": pattern()}]
    spec["groups"] = [{"name": "a", "params": [pattern()]}, {"name": "rest", "params": ["*"]}]
    try:
        build(load_spec(spec))
    except SpecError as err:
        assert err.key_path[:1] in (("surgery",), ("groups",), ("data",)), err
