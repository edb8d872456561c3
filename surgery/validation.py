"""Check a spec without training it: the schema first, then the real model.

`validate` is a fixed sequence of check steps over the loaded `Spec`. Each step returns the
located warnings it found and raises a `UserError` for a mistake; steps that need the real
model (and so torch) are skipped with ``against_model=False``. A new check is one function and
one row in `CHECKS`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .spec import Spec, load_spec


@dataclass(frozen=True)
class Check:
    """One validation step: `run(spec)` returns warnings and raises a `UserError` for a mistake."""

    name: str
    run: Callable[[Spec], Iterable[str]]
    needs_model: bool = False  # True: imports torch and builds the backbone


def _check_model(spec: Spec) -> Iterable[str]:
    from .builder import build  # torch only once the spec itself is sound

    from .checks import check_training

    built = build(spec)  # every pattern, group and weight resolved against the real backbone
    return check_training(spec, built)  # optimizer, transforms, data against the model, device


def _check_trackers(spec: Spec) -> Iterable[str]:
    from .trackers import check_available

    check_available(spec)  # the packages `log:` needs (found, not imported: no torch)
    return ()


# In order: cheap checks first, so a schema-level fix never waits for a model build.
CHECKS: tuple[Check, ...] = (
    Check("trackers", _check_trackers),
    Check("model", _check_model, needs_model=True),
)


def validate(
    spec: str | Path | Mapping,
    *,
    against_model: bool = True,
    overrides: Sequence[str] = (),
) -> tuple[str, ...]:
    """Check a spec the way `surgery run` would, without training it.

    Args:
        spec: a path to a YAML spec, or the spec as a dict.
        against_model: also build the model (imports torch, creates the backbone, applies the
            surgery, resolves groups and loads weights) to catch mistakes only the real model
            shows, such as a target that matches no module. False checks the schema, the values
            and their cross-field rules only: fast, and torch is never imported.
        overrides: ``key.path=value`` strings applied before validation, like ``--set``.

    Returns:
        The located warnings: settings that are legal but probably unintended, each a string
        ``file:line:col: key.path: text``. Empty when there are none.

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
    warnings = list(loaded.warnings)
    for check in CHECKS:
        if check.needs_model and not against_model:
            continue
        warnings.extend(check.run(loaded))
    return tuple(warnings)


__all__ = ["validate", "Check", "CHECKS"]
