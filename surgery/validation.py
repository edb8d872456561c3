"""Check a spec without training it: the schema first, then the real model.

`validate` is a fixed sequence of check steps over the loaded `Spec`. Each step returns the
located warnings it found and raises a `UserError` for a mistake. Steps that need the real model
(``needs_model=True``) get it built once, as their second argument, and are skipped with
``against_model=False`` (torch is then never imported). A new check is one function and one row
in `CHECKS`; `surgery validate`, `surgery sweep` (every variant) and the pytest plugin all run
`validate`, so every command that checks a spec runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spec import Spec, load_spec

if TYPE_CHECKING:  # pragma: no cover
    from .model.builder import Built


@dataclass(frozen=True)
class Check:
    """One validation step: `run(spec)` (or `run(spec, built)` with ``needs_model``) returns
    warnings and raises a `UserError` for a mistake."""

    name: str
    run: Callable[..., Iterable[str]]
    needs_model: bool = False  # True: called as run(spec, built), with the backbone built (imports torch)


class Validation(tuple):
    """The located warnings `validate` found (a tuple of strings, as before), with what it
    checked: `spec`, the spec as loaded, and `built`, the model built (None with
    ``against_model=False``)."""

    spec: Spec
    built: "Built | None"

    def __new__(cls, warnings: Iterable[str], spec: Spec, built: "Built | None") -> "Validation":
        self = super().__new__(cls, warnings)
        self.spec, self.built = spec, built
        return self


def _check_trackers(spec: Spec) -> Iterable[str]:
    from .train.trackers import check_available

    check_available(spec)  # the packages `log:` needs (found, not imported: no torch)
    return ()


def _check_training(spec: Spec, built: Built) -> Iterable[str]:
    from .train.checks import check_training

    return check_training(spec, built)  # optimizer, transforms, data against the model, device


# In order: cheap checks first, so a schema-level fix never waits for a model build (the model is
# built, which resolves every pattern, group and weight, just before the first check that needs it).
CHECKS: tuple[Check, ...] = (
    Check("trackers", _check_trackers),
    Check("training", _check_training, needs_model=True),
)


def validate(
    spec: str | Path | Mapping,
    *,
    against_model: bool = True,
    overrides: Sequence[Any] = (),
    warn: Callable[[str], None] | None = None,
    runs_root: Path | None = None,
) -> Validation:
    """Check a spec the way `surgery run` would, without training it.

    Args:
        spec: a path to a YAML spec, or the spec as a dict.
        against_model: also build the model (imports torch, creates the backbone, applies the
            surgery, resolves groups and loads weights) to catch mistakes only the real model
            shows, such as a target that matches no module. False checks the schema, the values
            and their cross-field rules only: fast, and torch is never imported.
        overrides: ``key.path=value`` strings applied before validation, like ``--set``.
        warn: called with each warning as soon as it is found (before a later step's error).
        runs_root: the folder `pretrained: run:NAME` looks in (default `runs`).

    Returns:
        The located warnings: settings that are legal but probably unintended, each a string
        ``file:line:col: key.path: text``; empty when there are none. A tuple, which also carries
        ``.spec`` (as loaded) and ``.built`` (the model, or None without ``against_model``).

    Raises:
        SpecError: a mistake in the spec, with file, line, column, key path, what was found,
            what was expected and a hint. Other `UserError`s (for example a weight file that
            cannot be read) may come from the model checks.

    Example:
        >>> validate({"model": {"backbone": "torchvision:resnet18", "pretrained": False},
        ...           "data": {"image_size": 32}})
        ()
        >>> validate("specs/resnet18-cbam-garbage.yaml", against_model=False)
        ()
    """
    loaded = load_spec(spec, overrides)
    warnings: list[str] = []

    def found(texts: Iterable[str]) -> None:
        for text in texts:
            warnings.append(text)
            if warn is not None:
                warn(text)

    found(loaded.warnings)
    built = None
    for check in CHECKS:
        if check.needs_model and not against_model:
            continue
        if check.needs_model and built is None:
            from .model.builder import build  # torch only once the spec itself is sound

            built = build(loaded, runs_root=runs_root)  # every pattern, group and weight resolved
        found(check.run(loaded, built) if check.needs_model else check.run(loaded))
    if against_model and built is None:  # no check needs the model: it is still built, to resolve the spec
        from .model.builder import build

        built = build(loaded, runs_root=runs_root)
    return Validation(warnings, loaded, built)


__all__ = ["validate", "Validation", "Check", "CHECKS"]
