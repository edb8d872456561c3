"""Resolve parameter groups: every parameter of the surgered model to exactly one group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

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
    layers: LayerMap | None = None  # the model's layer ids, for a group with layer_decay

    @property
    def name(self) -> str:
        return self.spec.name

    def lr_scales(self) -> dict[int, float]:
        """Layer id -> lr multiplier of this group's parameters (``layer_decay ** (top - id)``);
        ``{-1: 1.0}`` for a group without layer_decay."""
        if self.layers is None or self.spec.layer_decay is None:
            return {-1: 1.0}
        ids = sorted({self.layers.layer_of[p] for p in self.params})
        return {i: self.layers.scale(i, self.spec.layer_decay) for i in ids}

    def layer_of(self, param: str) -> int:
        """The layer id of one of its parameters; -1 for every parameter of a group without layer_decay."""
        if self.layers is None or self.spec.layer_decay is None:
            return -1
        return self.layers.layer_of[param]


@dataclass(frozen=True)
class LayerMap:
    """The depth of every parameter for layer-wise lr decay: layer 0 at the input, `top` the head.

    rule: how the depths were found: "timm group_matcher" or "structure" (see `layer_map`).
    layer_of: parameter name -> layer id, every parameter of the model.
    """

    rule: str
    layer_of: Mapping[str, int]

    @property
    def top(self) -> int:
        return max(self.layer_of.values(), default=0)

    def scale(self, layer: int, decay: float) -> float:
        """``decay ** (top - layer)``: 1 for the top layer (the head), as timm's ``layer_scales``."""
        return decay ** (self.top - layer)


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
    layers = None
    if any(g.layer_decay is not None for g in spec.groups):
        layers = layer_map(model, head=head, inserted=inserted)
        for g in spec.groups:
            _check_layer_decay(spec, g, owned[g.name], layers)
    return [ResolvedGroup(g, tuple(owned[g.name]), tuple(norms[g.name]), layers) for g in spec.groups]


def _check_layer_decay(spec: Spec, group: GroupSpec, params: Sequence[str], layers: LayerMap) -> None:
    """layer_decay needs parameters at two depths at least: at one depth it is a constant factor."""
    if group.layer_decay is None:
        return
    depths = sorted({layers.layer_of[p] for p in params})
    if len(depths) < 2:
        where = "the top layer, the head" if depths[0] == layers.top else f"layer {depths[0]} of 0..{layers.top}"
        raise spec.error(
            ("groups", group.index, "layer_decay"),
            f"group {group.name!r} has all its parameters at one depth: {where} (layers by {layers.rule}); "
            "layer_decay would only scale its lr by a constant",
            found=f"layer_decay: {group.layer_decay:g} on {', '.join(str(s) for s in group.params)}",
            expected="a group whose parameters span several layers (e.g. params: '*'), or no layer_decay",
            hint="set this group's lr directly; `surgery inspect SPEC --schedule` lists the layers",
        )


# a named selector that matched nothing: why, and what was expected instead
_EMPTY_SELECTOR = {
    "@inserted": (
        "the spec inserts no module with parameters",
        "a surgery section that inserts modules, or another pattern",
    ),
    "@norm": (
        "the model has no normalization layer with parameters",
        "a model with BatchNorm, GroupNorm or LayerNorm layers",
    ),
    "@head": ("no classifier head was found in this backbone", "a module path of the head (see `surgery inspect`)"),
}


def _selected_nothing(
    spec: Spec, sel: Selector, modules: Mapping[str, nn.Module], inserted: Sequence[str], head: Sequence[str]
) -> Exception:
    if sel.pattern in _EMPTY_SELECTOR:
        problem, expected = _EMPTY_SELECTOR[sel.pattern]
        what = f"'{sel.pattern}' selects nothing: {problem}"
        return spec.error(sel.where, what, found=sel.pattern, expected=expected)
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


# --------------------------------------------------------------------------- layer-wise lr decay
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
TIMM_RULE = "timm group_matcher"
STRUCTURE_RULE = "structure"


def layer_map(model: nn.Module, *, head: Sequence[str], inserted: Sequence[str]) -> LayerMap:
    """The layer id of every parameter, for ``layer_decay``.

    A timm model with a ``group_matcher`` gets exactly the layer ids of
    ``timm.optim.param_groups_layer_decay`` (``group_matcher(coarse=False)`` through timm's
    ``group_with_matcher``), computed on the model's own (not inserted) parameters. Any other model
    gets the structural rule of `_structural_layers`. Then, for both:

    - an inserted module takes the layer of the module it was inserted at: the highest layer among
      that module's own parameters when inserted after it, the lowest when before; a target
      without parameters (an activation, a pool) gives the layer of the parameter just before it
      in model order (layer 0 when none is);
    - the head (the declared head, or the backbone's classifier) is the top layer (with whatever
      timm's matcher leaves unmatched beside it, as timm does: convnext's ``head.norm``);
    - ids are renumbered 0..top without gaps (a removed block leaves none).
    """
    own = [(n, p) for n, p in model.named_parameters() if not any(covers(i, n) for i in inserted)]
    ids, rule = _timm_layers(model, own), TIMM_RULE
    if ids is None:
        ids, rule = _structural_layers(model, head, inserted), STRUCTURE_RULE
    names = [n for n, _ in model.named_parameters()]
    on_head = {n for n, _ in own if any(covers(h, n) for h in head)}
    if on_head:  # timm's matchers leave the head unmatched, on top already; the structural rule skips it
        body = [i for n, i in ids.items() if n not in on_head]
        top = max(body, default=-1) + 1 if rule == STRUCTURE_RULE else max(ids.values())
        ids.update({n: top for n in on_head})
    _place_inserted(model, names, ids, inserted)
    compact = {old: new for new, old in enumerate(sorted(set(ids.values())))}
    return LayerMap(rule, {n: compact[ids[n]] for n in names})


def _timm_layers(model: nn.Module, own: Sequence[tuple[str, nn.Parameter]]) -> dict[str, int] | None:
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        return None
    try:
        spec = matcher(coarse=False)
    except (NotImplementedError, TypeError):
        return None
    from timm.models._manipulate import group_with_matcher

    return dict(group_with_matcher(iter(own), spec, reverse=True))


def _structural_layers(model: nn.Module, head: Sequence[str], inserted: Sequence[str]) -> dict[str, int]:
    """Blocks by model order, for models without a ``group_matcher`` (torchvision's, user code).

    The model is walked from the root in the order it registers its children (for torchvision's
    models the order forward runs them). A module is split into its children when it is the root,
    a plain ``nn.Sequential``/``ModuleList``/``ModuleDict``, or a child of the root that holds a
    stack (a plain container of two or more parameter-holding children of one class, as vit's
    ``encoder`` holds ``encoder.layers``); any other module that holds parameters is one block.
    Each block is one layer, except that consecutive blocks without children outside a stack (a
    stem's conv and norm) share one. Parameters held directly by a split module (a class token, a
    position embedding) join layer 0. On torchvision's resnet18 this gives timm's layers exactly.
    """
    skip = tuple(head) + tuple(inserted)
    ids: dict[str, int] = {}
    stem: list[str] = []
    last = {"id": 0, "leaf": False, "any": False}
    for names, leaf in _blocks(model, "", skip, stem, root=True):
        if last["any"] and not (leaf and last["leaf"]):
            last["id"] += 1
        ids.update({n: last["id"] for n in names})
        last.update(leaf=leaf, any=True)
    ids.update({n: 0 for n in stem})
    return ids


def _stack(module: nn.Module) -> bool:
    kinds = [type(c) for c in module.children() if any(True for _ in c.parameters())]
    return type(module) in _CONTAINERS and len(kinds) >= 2 and len(set(kinds)) == 1


def _blocks(
    module: nn.Module, prefix: str, skip: Sequence[str], stem: list[str], *, root: bool = False, stacked: bool = False
) -> Iterator[tuple[list[str], bool]]:
    """(parameter names, may share a layer: no children and not in a stack) of each block under
    `module`, in model order."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    top_level = prefix and "." not in prefix
    if root or type(module) in _CONTAINERS or (top_level and any(_stack(c) for c in module.children())):
        stem.extend(join(n) for n, _ in module.named_parameters(recurse=False))
        for name, child in module.named_children():
            path = join(name)
            if not any(covers(s, path) for s in skip):
                yield from _blocks(child, path, skip, stem, stacked=_stack(module))
        return
    names = [join(n) for n, _ in module.named_parameters() if not any(covers(s, join(n)) for s in skip)]
    if names:
        yield names, not stacked and not any(True for _ in module.children())


def _place_inserted(model: nn.Module, names: Sequence[str], ids: dict[str, int], inserted: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    for path in inserted:
        module = modules[path]
        target, position = getattr(module, "target", path.rpartition(".")[0]), getattr(module, "position", "after")
        below = [ids[n] for n in names if n in ids and covers(target, n)] if target else []
        if below:
            layer = max(below) if position == "after" else min(below)
        else:  # the parameter just before it in model order
            first = next((i for i, n in enumerate(names) if covers(path, n)), 0)
            earlier = [ids[n] for n in names[:first] if n in ids]
            layer = earlier[-1] if earlier else 0
        ids.update({n: layer for n in names if covers(path, n)})
