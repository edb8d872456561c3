"""The one path syntax: dotted module paths and globs matched at dot boundaries.

- `layer3` is that module; as a parameter pattern it also covers everything below it
  (`layer3.0.conv1.weight`), never `layer30`.
- Each dot-separated part is a shell glob (`*`, `?`, `[12]`) matched against one whole name:
  `layer*` is layer1..layer4, `layer*.*.bn2` every bn2 one block down.
- `**` stands for any number of parts (none included): `**.bn2` is every module named bn2.
- `{type: MaxPool2d}` selects modules by class name (or `torch.nn.MaxPool2d`, the full name).
- `@inserted` selects every inserted module, `@head` the classifier head; in groups, `@norm`
  selects the parameters of every normalization layer (norm-only tuning).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Iterable, Mapping

from torch import nn


@lru_cache(maxsize=4096)
def _parts(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def _match(pat: tuple[str, ...], name: tuple[str, ...], prefix: bool) -> bool:
    if not pat:
        return prefix or not name
    head, rest = pat[0], pat[1:]
    if head == "**":
        return any(_match(rest, name[i:], prefix) for i in range(len(name) + 1))
    return bool(name) and fnmatchcase(name[0], head) and _match(rest, name[1:], prefix)


def matches(pattern: str, path: str) -> bool:
    """True when the pattern names exactly this module path."""
    return _match(_parts(pattern), tuple(path.split(".")) if path else (), prefix=False)


def covers(pattern: str, name: str) -> bool:
    """True when the pattern names this path or one of its ancestors (dot boundaries only)."""
    return _match(_parts(pattern), tuple(name.split(".")), prefix=True)


def type_names(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    original = getattr(cls, "_surgery_original", cls)  # a module with inserts keeps its own type name
    return original.__name__, f"{original.__module__}.{original.__qualname__}"


def _public_type_name(cls: type) -> str:
    # torch.nn.modules.pooling.MaxPool2d -> torch.nn.MaxPool2d: the name users write
    module = cls.__module__
    if module.startswith("torch.nn.modules."):
        module = "torch.nn"
    return f"{module}.{cls.__qualname__}"


def is_type(module: nn.Module, type_name: str) -> bool:
    short, full = type_names(module)
    cls = getattr(type(module), "_surgery_original", type(module))
    return type_name in (short, full, _public_type_name(cls))


def select_modules(modules: Mapping[str, nn.Module], pattern: str | None, type_name: str | None) -> list[str]:
    """Module paths (in model order) that a pattern or a type selects; the root ('') never."""
    if type_name is not None:
        return [p for p, m in modules.items() if p and is_type(m, type_name)]
    return [p for p in modules if p and matches(pattern, p)]


def nearest(pattern: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Closest real paths to a pattern that matched nothing, compared at the same depth first.

    For a glob whose leading parts do match (`layer*.*.bn3`), the answer is the glob with its
    first failing part corrected from the real names there (`layer*.*.bn1`, `layer*.*.bn2`)."""
    from ..errors import close_matches

    candidates = list(candidates)
    fixed = _corrected_glob(pattern, candidates, n)
    if fixed:
        return fixed
    depth = len(_parts(pattern))
    same_depth = [c for c in candidates if len(c.split(".")) == depth]
    found = close_matches(pattern, same_depth, n=n, cutoff=0.5)
    return found or close_matches(pattern, candidates, n=n, cutoff=0.5)


def _corrected_glob(pattern: str, candidates: list[str], n: int) -> list[str]:
    from ..errors import close_matches

    parts = _parts(pattern)
    if not any(c in pattern for c in "*?["):
        return []
    split = [tuple(c.split(".")) for c in candidates]
    if "**" in parts:  # depth varies: correct the last part from every module's own name
        names = {c[-1] for c in split}
        guesses = [".".join((*parts[:-1], name)) for name in close_matches(parts[-1], names, n=n, cutoff=0.5)]
        return [g for g in guesses if any(matches(g, c) for c in candidates)]
    for i in range(len(parts) - 1, 0, -1):
        names = {c[i] for c in split if len(c) > i and _match(parts[:i], c[:i], prefix=False)}
        if not names:
            continue
        guesses = [
            ".".join((*parts[:i], name, *parts[i + 1 :])) for name in close_matches(parts[i], names, n=n, cutoff=0.5)
        ]
        return [g for g in guesses if any(matches(g, c) for c in candidates)]
    return []
