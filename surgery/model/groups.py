"""Resolve parameter groups: every parameter of the surgered model to exactly one group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from ..errors import did_you_mean
from ..spec import GroupSpec, Selector, Spec
from .paths import covers, is_type, nearest, select_modules, type_names


@dataclass(frozen=True)
class ResolvedGroup:
    """A spec group bound to the concrete names of the model it was resolved on.

    params: parameter names (as in `model.named_parameters()`), in model order.
    norm_modules: paths of normalization modules owned by this group (kept in eval mode while
        the group is frozen, unless `spec.norm == "train"`).
    """

    spec: GroupSpec
    params: tuple[str, ...]
    norm_modules: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec.name


# Normalization layers: their weights never decay by default, and frozen groups keep them in eval mode.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm* (timm's BatchNormAct2d too)
    nn.GroupNorm,
    nn.LayerNorm,  # timm's LayerNorm2d subclasses it
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _selects(
    sel: Selector, name: str, modules: Mapping[str, nn.Module], inserted: Sequence[str], head: Sequence[str]
) -> bool:
    """Does a selector cover a parameter (or module) path? Ancestors count: `layer3` covers `layer3.0.conv1.weight`."""
    if sel.pattern == "@inserted":
        return any(covers(p, name) for p in inserted)
    if sel.pattern == "@head":
        return any(covers(p, name) for p in head)
    if sel.pattern == "@norm":  # norm-only tuning: the parameters of every normalization layer
        return isinstance(modules.get(name.rpartition(".")[0]), NORM_TYPES)
    if sel.type is not None:
        parts = name.split(".")
        return any(
            is_type(modules[".".join(parts[:i])], sel.type)
            for i in range(1, len(parts) + 1)
            if ".".join(parts[:i]) in modules
        )
    return covers(sel.pattern, name)


def resolve_groups(
    spec: Spec, model: nn.Module, *, inserted: Sequence[str], head: Sequence[str]
) -> list[ResolvedGroup]:
    """Give every parameter to the first group (in spec order) with a selector that covers it.

    Raises SpecError for a selector that matches no parameter of the model at all, a group
    left empty because earlier groups took everything it matches, and parameters no group covers.
    """
    modules = dict(model.named_modules())
    names = [n for n, _ in model.named_parameters()]
    for group in spec.groups:
        for sel in group.params:
            if not any(_selects(sel, n, modules, inserted, head) for n in names):
                raise _selected_nothing(spec, sel, modules, inserted, head)
    owner: dict[str, str] = {}
    owned: dict[str, list[str]] = {g.name: [] for g in spec.groups}
    for n in names:
        for group in spec.groups:
            if any(_selects(sel, n, modules, inserted, head) for sel in group.params):
                owner[n] = group.name
                owned[group.name].append(n)
                break
    for group in spec.groups:
        if not owned[group.name]:
            earlier = [g.name for g in spec.groups[: group.index]]
            raise spec.error(
                ("groups", group.index, "params"),
                f"group {group.name!r} gets no parameters: "
                f"earlier groups ({', '.join(earlier)}) already own every parameter it matches",
                found=", ".join(str(s) for s in group.params),
                expected="patterns that leave this group something (the first matching group wins)",
                hint="move this group before the broader one",
            )
    uncovered = [n for n in names if n not in owner]
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (f" ... ({len(uncovered)} in all)" if len(uncovered) > 5 else "")
        raise spec.error(
            ("groups",),
            f"{len(uncovered)} parameters belong to no group",
            found=shown,
            expected="every parameter in exactly one group",
            hint="add a catch-all group last: {name: rest, params: ['*'], lr: ...}",
        )
    norms: dict[str, list[str]] = {g.name: [] for g in spec.groups}
    for path, module in modules.items():
        if not isinstance(module, NORM_TYPES):
            continue
        own = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)]
        if own:  # the group that owns its weight owns the norm, whatever pattern gave it the weight
            norms[owner[own[0]]].append(path)
            continue
        for group in spec.groups:
            if any(_selects(sel, path, modules, inserted, head) for sel in group.params):
                norms[group.name].append(path)
                break
    return [ResolvedGroup(g, tuple(owned[g.name]), tuple(norms[g.name])) for g in spec.groups]


def _selected_nothing(
    spec: Spec, sel: Selector, modules: Mapping[str, nn.Module], inserted: Sequence[str], head: Sequence[str]
) -> Exception:
    if sel.pattern == "@inserted":
        return spec.error(
            sel.where,
            "'@inserted' selects nothing: the spec inserts no module with parameters",
            found="@inserted",
            expected="a surgery section that inserts modules, or another pattern",
        )
    if sel.pattern == "@norm":
        return spec.error(
            sel.where,
            "'@norm' selects nothing: the model has no normalization layer with parameters",
            found="@norm",
            expected="a model with BatchNorm, GroupNorm or LayerNorm layers",
        )
    if sel.pattern == "@head":
        return spec.error(
            sel.where,
            "'@head' selects nothing: no classifier head was found in this backbone",
            found="@head",
            expected="a module path of the head (see `surgery inspect`)",
        )
    # modules that hold parameters somewhere below them: the only useful suggestions
    holders = {p for p, m in modules.items() if p and any(True for _ in m.parameters())}
    matched = select_modules(modules, sel.pattern, sel.type)
    if matched:  # it names real modules, they just hold no parameters (maxpool, relu, ...)
        shown = ", ".join(matched[:4]) + (f" ... ({len(matched)} in all)" if len(matched) > 4 else "")
        return spec.error(
            sel.where,
            f"{sel} selects only modules without parameters: {shown}",
            found=str(sel),
            expected="modules that hold parameters (a group trains parameters)",
            hint="drop this pattern; `surgery inspect SPEC` shows parameter counts",
        )
    if sel.type is not None:
        types = sorted({type_names(m)[0] for p, m in modules.items() if p in holders})
        return spec.error(
            sel.where,
            f"no module with parameters has type {sel.type!r}",
            found=sel.type,
            expected="a class name of the model's modules",
            hint=did_you_mean(sel.type, types),
        )
    close = nearest(sel.pattern, [p for p in modules if p in holders])
    return spec.error(
        sel.where,
        f"no parameter of the model is under {sel.pattern!r}",
        found=sel.pattern,
        expected="a module path or glob of the surgered model (`surgery inspect SPEC` lists them)",
        hint=("did you mean " + " or ".join(repr(c) for c in close) + "?") if close else None,
    )
