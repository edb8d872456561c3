"""Order and conflicts: every surgery operation resolved and built, in order, before the model is touched.

    model.in_chans  ->  model.head  ->  surgery entries, in the order written  ->  the head's width

The declared head is placed where the classifier was before the entries run (an entry that
changes it collides with model.head), but it is built for the width the body gives after them:
until then an identity stands in its place, so removing the last stage leaves a head that fits.

Inserts alone take the direct path: every target resolved on the unmodified backbone, the modules
attached by `apply_surgery` afterwards. Once an entry replaces or removes a module, later
entries must see its effect (removing a max-pool changes every later map size), so the plan is
made on a copy: each operation is resolved against the copy as the entries before it left it,
applied to it, and the copy probed again. The copy becomes the model only when every entry
resolved; an error leaves the backbone as it was. Two entries that change the same module (or
a module and its parent), or an insert at a module an earlier entry removed, are errors that
name both spec lines.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from ..errors import describe_exception
from ..spec import InsertSpec, LoraSpec, RemoveSpec, ReplaceSpec, Spec
from .adapters import Adapter, apply_adapters, plan_lora
from .insert import Insertion, Shapes, _matched_nothing, apply_surgery, insert_targets, plan_insert, plan_surgery, probe
from .paths import select_modules
from .replace import (
    Change,
    _type_name,
    adapt_conv,
    build_head,
    build_pool,
    build_replacement,
    entry_label,
    first_conv,
    global_pool,
    kept_keys,
    local_pool,
    main_classifier,
    resolve_class,
    set_module,
)


@dataclass
class Plan:
    """What surgery will do. model: the surgered copy when an operation changes keys, else None
    (`apply_surgery` then attaches `inserts` to the backbone itself). shapes: the probe after
    the last key-changing operation; input_size: the model's input (channels from model.in_chans)."""

    inserts: list[Insertion]
    changes: list[Change]
    model: nn.Module | None
    shapes: Mapping[str, Shapes]
    input_size: tuple[int, ...]
    head: tuple[str, ...] = ()
    order: list[object] = field(default_factory=list)
    adapters: list[Adapter] = field(
        default_factory=list
    )  # LoRA: applied by `apply_surgery`'s caller on the direct path


def changes_keys(spec: Spec) -> bool:
    """Does the spec replace, remove, adapt or declare anything (operations that change keys)?"""
    return (
        any(isinstance(s, (ReplaceSpec, RemoveSpec)) for s in spec.surgery)
        or spec.model.channels != 3
        or spec.model.head is not None
    )


def _within(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


class _Ledger:
    """Which entry changed which module, to name both lines when a later entry collides with it."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.changed: dict[str, tuple[str, tuple]] = {}  # path -> (kind, spec key path)
        self.inserted: dict[str, tuple] = {}  # insert target -> spec key path

    def _first(self, where: tuple) -> str:
        return entry_label(self.spec, where)

    def check_change(self, path: str, kind: str, where: tuple) -> None:
        where = where + (kind,) if where[0] == "surgery" else where  # at the entry's replace: / remove: key
        for other, (other_kind, other_where) in self.changed.items():
            if other_kind == "in_chans" and kind == "replace" and other == path:
                continue  # replacing the adapted first conv (a CIFAR stem on gray input): it reads in_chans
            if _within(path, other):
                relation = (
                    "the same module"
                    if path == other
                    else f"{other}, inside it"
                    if other.startswith(path + ".")
                    else f"{other}, which holds it"
                )
                raise self.spec.error(
                    where,
                    f"{path} is changed twice: this entry would {kind} it, and "
                    f"{self._first(other_where)} already {other_kind}s {relation}",
                    found=path,
                    expected="each module changed by one entry",
                    hint=f"merge this entry with {self._first(other_where)}, or narrow one of the patterns",
                )
        for target, other_where in self.inserted.items():
            if target == path or target.startswith(path + "."):
                raise self.spec.error(
                    where,
                    f"this entry would {kind} {path}, where {self._first(other_where)} "
                    f"inserted a module at {target}: that module would be lost",
                    found=path,
                    expected="replace or remove before inserting at the same module",
                    hint="move this entry above the insert",
                )

    def check_gone(self, selectors) -> None:
        """A path inside a module an earlier entry replaced or removed no longer exists: say which entry took it."""
        for sel in selectors:
            for other, (other_kind, other_where) in self.changed.items():
                if sel.pattern and sel.pattern.startswith(other + ".") and not any(c in sel.pattern for c in "*?["):
                    raise self.spec.error(
                        sel.where,
                        f"{sel.pattern} is gone: {self._first(other_where)} already "
                        f"{other_kind}s {other}, which held it",
                        found=sel.pattern,
                        expected="a module that is still in the model",
                        hint=f"target {other} itself, or drop the earlier entry",
                    )

    def check_insert(self, target: str, where: tuple) -> None:
        for other, (other_kind, other_where) in self.changed.items():
            if other_kind == "remove" and _within(target, other) and not other.startswith(target + "."):
                raise self.spec.error(
                    where,
                    f"{target} was removed by {self._first(other_where)}; an insert there would sit on an identity",
                    found=target,
                    expected="a module that is still in the model",
                    hint="insert at the module before or after it, or drop the remove",
                )


def _reprobe(
    spec: Spec,
    model: nn.Module,
    size: Sequence[int],
    where: tuple,
    what: str,
    old: Mapping[str, Shapes],
    paths: Sequence[str],
) -> dict[str, Shapes]:
    try:
        return probe(model, size)
    except Exception as exc:  # noqa: BLE001 - the model's own error, blamed on the entry that caused it
        seen = "; ".join(
            f"{p} took {list(old[p].inputs)} and gave {list(old[p].output)}"
            for p in paths[:2]
            if p in old and old[p].inputs is not None and old[p].output is not None
        )
        raise spec.error(
            where,
            f"after {what}, the model fails on a {list(size)} input: {describe_exception(exc, 300)}",
            found=", ".join(paths[:4]),
            expected="a change the rest of the model still fits",
            hint=(seen + ": what follows expects that output") if seen else None,
        ) from None


def _selected(spec: Spec, selectors, modules: Mapping[str, nn.Module]) -> list[str]:
    targets: list[str] = []
    for sel in selectors:
        if sel.pattern in ("@inserted", "@head"):
            raise spec.error(
                sel.where,
                f"{sel.pattern} cannot be replaced or removed here",
                found=sel.pattern,
                expected="a module path, a glob or {type: ClassName}",
                hint="declare a classifier with model.head" if sel.pattern == "@head" else None,
            )
        found = [p for p in select_modules(modules, sel.pattern, sel.type) if p]
        if not found:
            raise _matched_nothing(spec, sel, modules)
        targets.extend(t for t in found if t not in targets)
    return targets


class _HeadSlot(nn.Identity):
    """Where the declared head goes, while the surgery entries run: passes the features through."""


class _Planner:
    """Applies the spec's operations one by one to a copy of the backbone, re-probing shapes after
    each, and records every change (`changes`) and insertion (`inserts`) for the load report."""

    def __init__(
        self, spec: Spec, model: nn.Module, shapes: Mapping[str, Shapes], head: Sequence[str], size: Sequence[int]
    ) -> None:
        self.spec, self.work, self.shapes, self.head, self.size = spec, copy.deepcopy(model), shapes, head, tuple(size)
        self.ledger = _Ledger(spec)
        self.changes: list[Change] = []
        self.inserts: list[Insertion] = []
        self.taken: dict[str, set[str]] = {}
        self.head_slot: tuple[Change, nn.Module] | None = None  # the declared head's change, its module
        self.adapters: list[Adapter] = []

    def change(self, kind: str, path: str, where: tuple, new: nn.Module, words: str, **extra: Any) -> Change:
        self.ledger.check_change(path, kind, where)
        self.check_adapted(path, f"{kind} it", where + ((kind,) if where[0] == "surgery" else ()))
        old = self.work.get_submodule(path)
        c = Change(
            kind,
            path,
            where,
            f"{entry_label(self.spec, where)}: {words}",
            _type_name(old),
            _type_name(new),
            new,
            **extra,
        )
        set_module(self.work, path, new)
        self.ledger.changed[path] = (kind, where)
        self.changes.append(c)
        return c

    def reprobe(self, where: tuple, what: str, paths: Sequence[str]) -> None:
        self.shapes = _reprobe(self.spec, self.work, self.size, where, what, self.shapes, paths)

    def in_chans(self) -> None:
        spec, channels, where = self.spec, self.spec.model.channels, ("model", "in_chans")
        path = first_conv(self.work, self.shapes)
        if path is None:
            raise spec.error(
                where,
                f"no convolution of {spec.model.backbone} reads the 3-channel input, so there "
                "are no input filters to adapt",
                found=str(channels),
                expected="a backbone whose first layer is a Conv2d",
            )
        conv = self.work.get_submodule(path)
        self.change(
            "in_chans",
            path,
            where,
            adapt_conv(conv, channels),
            f"{path} reads {channels} channels, its 3-channel filters adapted (timm adapt_input_conv)",
            in_chans=channels,
        )
        self.size = (channels, *self.size[1:])
        self.reprobe(where, f"adapting {path} to {channels} channels", [path])

    def declared_head(self) -> None:
        spec, declared, where = self.spec, self.spec.model.head, ("model", "head")
        classifier = main_classifier(self.work, self.head, self.shapes)
        if classifier is None:
            raise spec.error(
                where,
                f"{spec.model.backbone} has no recognisable classifier for model.head to replace",
                found=", ".join(self.head) or "no head found",
                expected="a backbone ending in an nn.Linear on (batch, features): fc, classifier, head.fc, "
                "classifier[-1]",
                hint="use surgery: replace: <its last layer> with: Linear instead, or another backbone",
            )
        if declared.pool is not None:
            pool = global_pool(self.work, self.shapes, classifier)
            if pool is None:
                local = local_pool(self.work, self.shapes, classifier)
                out = self.shapes[local].output if local is not None else None
                why = (
                    f": {local} ({_type_name(self.work.get_submodule(local))}) pools to a "
                    f"{out[2]}x{out[3]} map, flattened into {classifier.rpartition('.')[0] or classifier}: "
                    "not one value per channel"
                    if out is not None and len(out) == 4
                    else ""
                )
                raise spec.error(
                    where + ("pool",),
                    f"no global pooling module runs before {classifier}{why}",
                    found=declared.pool,
                    expected="a backbone that pools globally (to 1x1) before its "
                    "classifier, with an AdaptiveAvgPool2d or timm's global_pool",
                    hint="leave pool out: the backbone pools its own way",
                )
            self.change(
                "pool",
                pool,
                where + ("pool",),
                build_pool(declared.pool, self.shapes[pool].output),
                f"{pool} pools {declared.pool}",
            )
        if declared.replaces_classifier:
            old = self.work.get_submodule(classifier)
            in_features = int(self.shapes[classifier].inputs[1])  # the probe's width, not the old layer's attribute
            head = build_head(spec, in_features, old.out_features)  # built now: its initialisation as always
            # an identity holds its place while the entries run: one that changes the body's width
            # (remove: layer4) must not trip over a head built for the width before it
            change = self.change("head", classifier, where, _HeadSlot(), "")
            self.head_slot = (change, head)
        self.reprobe(where, "declaring the head", [classifier])

    def finish_head(self) -> None:
        """The declared head, for the width the body gives after every entry (rebuilt if that changed)."""
        if self.head_slot is None:
            return
        (change, head), spec, where = self.head_slot, self.spec, ("model", "head")
        sh = self.shapes.get(change.path)
        if sh is None or sh.inputs is None or len(sh.inputs) != 2:
            raise spec.error(
                where,
                f"after the surgery entries, {change.path} (the declared head) receives "
                + (f"a {list(sh.inputs)} map" if sh is not None and sh.inputs is not None else "nothing"),
                found=change.path,
                expected="a (batch, features) vector before the head",
                hint="keep the backbone's global pooling (the head's pool: sets how it pools)",
            )
        in_features, out_features = int(sh.inputs[1]), head[-1].out_features
        if head[0].in_features != in_features:
            head = build_head(spec, in_features, out_features)
        set_module(self.work, change.path, head)
        change.module, change.new_type = head, _type_name(head)
        change.label = (
            f"{entry_label(spec, where)}: {change.path} becomes the declared head ({in_features} -> "
            + " -> ".join(str(h) for h in (*spec.model.head.hidden, out_features))
            + ")"
        )
        self.reprobe(where, "declaring the head", [change.path])

    def targets(self) -> dict[str, nn.Module]:
        """The backbone's own modules: inserted ones are never targets (as on the unmodified backbone)."""
        inserted = [i.path for i in self.inserts]
        return {
            p: m for p, m in self.work.named_modules() if not any(p == q or p.startswith(q + ".") for q in inserted)
        }

    def check_adapted(self, path: str, doing: str, where: tuple) -> None:
        """A module that carries a LoRA adapter from an earlier entry cannot be changed or inserted at."""
        for ad in self.adapters:
            if _within(path, ad.path):
                first = entry_label(self.spec, ("surgery", ad.index))
                raise self.spec.error(
                    where,
                    f"this entry would {doing} at {path}, where {first} put a LoRA adapter on {ad.path}",
                    found=path,
                    expected="a module no LoRA entry adapts",
                    hint="move the LoRA entry below this one, or target another module",
                )

    def lora(self, item: LoraSpec) -> None:
        taken = {c.path: c.where for c in self.changes if c.kind == "remove"}
        taken.update({i.target: ("surgery", i.index) for i in self.inserts})
        planned = plan_lora(self.spec, item, self.targets(), taken, self.adapters)
        apply_adapters(self.work, planned)
        self.adapters.extend(planned)

    def insert(self, item: InsertSpec) -> None:
        modules = self.targets()
        targets = insert_targets(self.spec, item, modules, self.head)
        for t in targets:
            self.ledger.check_insert(t, ("surgery", item.index, "at"))
            self.check_adapted(t, "insert", ("surgery", item.index, "at"))
        planned = plan_insert(self.spec, item, modules, self.shapes, self.head, self.taken, targets)
        apply_surgery(self.work, planned)
        for ins in planned:
            self.ledger.inserted.setdefault(ins.target, ("surgery", item.index))
        self.inserts.extend(planned)

    def replace_or_remove(self, item: ReplaceSpec | RemoveSpec) -> None:
        spec, key, where = self.spec, "replace" if isinstance(item, ReplaceSpec) else "remove", ("surgery", item.index)
        targets = _selected(spec, item.replace if key == "replace" else item.remove, self.targets())
        cls = resolve_class(spec, item) if key == "replace" else None
        for target in targets:
            old = self.work.get_submodule(target)
            if isinstance(old, (nn.ModuleList, nn.ModuleDict)):
                raise spec.error(
                    where + (key,),
                    f"{target} is a {type(old).__name__}, a container that is never called "
                    f"itself, so it cannot be {key}d as one module",
                    found=target,
                    expected="a module called in the forward pass",
                    hint=f"{key} its elements: '{target}.*'",
                )
            if key == "replace":
                new = build_replacement(spec, item, cls, old, self.shapes.get(target), target)
                kept, _ = kept_keys(old, new)
                self.change(
                    "replace",
                    target,
                    where,
                    new,
                    f"replace {target} {_type_name(old)} with {cls.__name__}"
                    + (f", keeping {', '.join(kept)}" if kept else ""),
                )
            else:
                self.change("remove", target, where, nn.Identity(), f"remove {target} ({_type_name(old)})")
        what = f"{'replacing' if key == 'replace' else 'removing'} {', '.join(targets[:3])}" + (
            " ..." if len(targets) > 3 else ""
        )
        self.reprobe(where, what, targets)


def plan_operations(
    spec: Spec, model: nn.Module, shapes: Mapping[str, Shapes], head: Sequence[str], size: Sequence[int]
) -> Plan:
    """Resolve and build every operation of the spec in order; the backbone itself is not touched.

    Order: model.in_chans, then model.head, then the surgery entries as written, each on the
    result of the ones before (a removed max-pool changes the shapes every later entry sees).

    Raises:
        SpecError: at the entry (and naming any earlier entry it collides with) for every misuse.
    """
    if not changes_keys(spec):
        inserts = plan_surgery(spec, model, shapes, head)
        taken = {i.target: ("surgery", i.index) for i in inserts}  # an insert's target, whichever entry comes first
        own = dict(model.named_modules())
        adapters: list[Adapter] = []
        for item in spec.surgery:
            if isinstance(item, LoraSpec):
                adapters.extend(plan_lora(spec, item, own, taken, adapters))
        return Plan(inserts, [], None, shapes, tuple(size), tuple(head), adapters=adapters)
    planner = _Planner(spec, model, shapes, head, size)
    if spec.model.channels != 3:
        planner.in_chans()
    if spec.model.head is not None:
        planner.declared_head()
    for item in spec.surgery:
        planner.ledger.check_gone(
            item.at
            if isinstance(item, InsertSpec)
            else item.replace
            if isinstance(item, ReplaceSpec)
            else item.lora
            if isinstance(item, LoraSpec)
            else item.remove
        )
        if isinstance(item, InsertSpec):
            planner.insert(item)
        elif isinstance(item, LoraSpec):
            planner.lora(item)
        else:
            planner.replace_or_remove(item)
    planner.finish_head()
    return Plan(
        planner.inserts,
        planner.changes,
        planner.work,
        planner.shapes,
        planner.size,
        tuple(head),
        adapters=planner.adapters,
    )


__all__ = ["Plan", "plan_operations", "changes_keys"]
