"""The spec: `load_spec` builds the typed, frozen `Spec` once, and checks the rules that relate keys.

    load_spec(path | dict, overrides)
      source.parse_yaml      YAML text -> plain data + the line of every key path
      inherit.resolve_bases  `base:` files merged underneath, each value marked with its own file
      source.apply_overrides --set key.path=value
      schema.check_schema    JSON Schema, worded and located
      schema.fill_defaults   every default written out
      _typed                 plain data -> Spec (sections.py: ModelSpec, InsertSpec, GroupSpec, TrainSpec, DataSpec)
      _check_cross_fields    rules that relate one key to another

    sections.py  the typed sections;  schema.py + schema.json  the JSON Schema;  source.py  YAML with
    the line of every value, --set;  inherit.py  `base:`

`load_spec` is the only place where raw dicts become typed objects; every later phase takes a
`Spec` and reads its sections by attribute. Each `Spec` keeps its `Source`, so checks against
the real model (`build`) still report the file, line and key path of the value they reject.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import SpecError, format_path, quote_value
from .inherit import BASE_KEY, resolve_bases
from .schema import check_schema, check_values, fill_defaults, schema
from .sections import (
    PATH_KEYS,
    AugmentSpec,
    DataSpec,
    ErasingSpec,
    GroupSpec,
    HeadSpec,
    InsertSpec,
    LogSpec,
    LoraSpec,
    MixupSpec,
    MlflowSpec,
    ModelSpec,
    MonitorSpec,
    OptimizerSpec,
    RegularizeSpec,
    RemoveSpec,
    ReplaceSpec,
    SchedulerSpec,
    Section,
    Selector,
    Spec,
    SubsetSpec,
    SurgeryEntry,
    TrainSpec,
    UnfreezeRule,
)  # noqa: F401 - the face of the package
from .source import Override, Source, apply_overrides, name_from_file, parse_yaml, read_spec_text


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
        raise source.error(
            where,
            "a learning-rate map must say what the lr is from epoch 0",
            found=quote_value(value),
            expected="a first key 0, e.g. {0: 1.0e-4, 10: 1.0e-5}",
        )
    return steps


_OPERATIONS = {"insert": ("at",), "replace": ("with",), "remove": (), "lora": ()}  # operation -> keys it needs
_ONLY = {
    "at": "insert",
    "position": "insert",
    "init": "insert",
    "with": "replace",
    "allow_shape_change": "replace",
    "rank": "lora",
    "alpha": "lora",
    "dropout": "lora",
    "targets": "lora",
}  # key -> the one operation it belongs to


def _check_entries(data: dict, source: Source) -> None:
    """Each surgery entry names exactly one operation and only that operation's keys (before defaults fill them)."""
    for i, entry in enumerate(data.get("surgery") or []):
        where = ("surgery", i)
        ops = [op for op in _OPERATIONS if op in entry]
        if len(ops) != 1:
            raise source.error(
                where,
                "a surgery entry is one operation" if ops else "a surgery entry names no operation",
                found=", ".join(ops) if ops else ", ".join(map(str, entry)) or "{}",
                expected="exactly one of insert (+ at), replace (+ with), remove, lora",
                hint="split it into one entry per operation; they apply in order" if ops else None,
            )
        op = ops[0]
        for key in _OPERATIONS[op]:
            if key not in entry:
                raise source.error(
                    where,
                    f"{op} needs `{key}`",
                    found=f"{op}: {quote_value(entry[op])}",
                    expected=f"{op} with {key}" + (": a class name such as GroupNorm" if key == "with" else ""),
                )
        for key, owner in _ONLY.items():
            if key in entry and owner != op:
                raise source.error(
                    where + (key,),
                    f"`{key}` belongs to {owner} entries, not to {op}",
                    found=key,
                    expected=f"only the keys of {op}: "
                    + ", ".join((op, *_OPERATIONS[op], *(("args",) if op != "remove" else ()))),
                    hint=f"a separate entry `{owner}: ...` does that"
                    if op != "remove" or key != "with"
                    else "to put another module in its place, use replace: ... with: ...",
                )
        if op in ("remove", "lora") and "args" in entry:
            raise source.error(
                where + ("args",),
                f"{op} takes no arguments",
                found=quote_value(entry["args"]),
                expected="remove: TARGET alone"
                if op == "remove"
                else "lora: TARGET with rank, alpha, dropout, targets",
            )


def _surgery_entry(s: dict, i: int) -> SurgeryEntry:
    if "replace" in s:
        return ReplaceSpec(
            _selectors(s["replace"], ("surgery", i, "replace")),
            s["with"],
            s["args"],
            i,
            bool(s.get("allow_shape_change", False)),
        )
    if "lora" in s:
        return LoraSpec(
            _selectors(s["lora"], ("surgery", i, "lora")),
            int(s.get("rank", 8)),
            float(s.get("alpha", 16)),
            float(s.get("dropout", 0.0)),
            tuple(s.get("targets", ())),
            i,
        )
    if "remove" in s:
        return RemoveSpec(_selectors(s["remove"], ("surgery", i, "remove")), i)
    return InsertSpec(s["insert"], _selectors(s["at"], ("surgery", i, "at")), s["position"], s["init"], s["args"], i)


def _unfreeze(value: Any, where: tuple) -> tuple[int | None, UnfreezeRule | None]:
    """`unfreeze_at` as (plain epoch, rule): an integer, 'never', or an event rule."""
    if isinstance(value, dict):
        plateau = MonitorSpec.parse(value["plateau"]) if "plateau" in value else None
        return None, UnfreezeRule(value.get("after"), value.get("epochs"), plateau, where)
    return (None if value == "never" else int(value)), None


def _default_groups(data: dict) -> list[dict]:
    """One group that trains everything; with LoRA entries, the adapters and the head train and
    the pretrained weights stay frozen (the point of an adapter)."""
    if any("lora" in s for s in data["surgery"]):
        return [
            {"name": "adapters", "params": ["**.lora_A", "**.lora_B", "@head"]},
            {"name": "frozen", "params": "*", "unfreeze_at": "never"},
        ]
    return [{"name": "all", "params": "*"}]


def _typed(data: dict, source: Source) -> Spec:
    m = data["model"]
    head = m.get("head")
    head_spec = (
        None
        if head is None
        else HeadSpec(head["pool"], tuple(head["hidden"]), float(head["dropout"]), head["act"], head["norm"])
    )
    model = ModelSpec(
        m["backbone"],
        m["pretrained"],
        m["num_classes"],
        m["args"],
        m["key_map"],
        m["checkpoint_key"],
        m["reset_head"],
        m.get("in_chans"),
        head_spec,
    )
    for s in data["surgery"]:  # fill_defaults wrote insert's defaults into every entry
        if "insert" not in s:
            s.pop("position", None), s.pop("init", None)
            if "remove" in s or "lora" in s:
                s.pop("args", None)
    inserts = tuple(_surgery_entry(s, i) for i, s in enumerate(data["surgery"]))
    default_groups = "groups" not in data
    raw_groups = data.get("groups") or _default_groups(data)
    default_lr = data["train"]["optimizer"]["lr"]
    groups = []
    seen: dict[str, int] = {}
    for i, g in enumerate(raw_groups):
        g.setdefault("lr", default_lr)
        for key, sub in schema()["$defs"]["group"]["properties"].items():
            if key not in g and "default" in sub:
                g[key] = copy.deepcopy(sub["default"])
        if g["name"] in seen:
            raise source.error(
                ("groups", i, "name"),
                f"two groups are named {g['name']!r}",
                expected="a distinct name for each group",
                hint=f"the first is groups[{seen[g['name']]}]",
            )
        seen[g["name"]] = i
        unfreeze_at, rule = _unfreeze(g["unfreeze_at"], ("groups", i, "unfreeze_at"))
        groups.append(
            GroupSpec(
                name=g["name"],
                params=_selectors(g["params"], ("groups", i, "params")),
                lr=_lr(g["lr"], ("groups", i, "lr"), source),
                unfreeze_at=unfreeze_at,
                weight_decay=g["weight_decay"],
                decay_norm_and_bias=g["decay_norm_and_bias"],
                norm=g["norm"],
                warmup_epochs=g["warmup_epochs"],
                index=i,
                unfreeze_rule=rule,
                layer_decay=g["layer_decay"],
            )
        )
    if default_groups:
        data["groups"] = raw_groups
    return Spec(
        name=data["name"],
        seed=data["seed"],
        model=model,
        surgery=inserts,
        groups=tuple(groups),
        train=TrainSpec.parse(data["train"]),
        data=DataSpec.parse(data["data"]),
        raw=data,
        source=source,
        default_groups=default_groups,
        log=LogSpec.parse(data.get("log") or {}),  # no default written: a spec without trackers reads as before
    )


def _check_cross_fields(spec: Spec) -> tuple[str, ...]:
    """Rules the schema cannot say: they relate one key to another.

    Settings that only fall outside a run shortened on purpose (`--set train.epochs=1` for a
    smoke run) are warnings, not errors: a group unfreezing after the last epoch just never
    trains in that run. Returns the warnings, each with its location.
    """
    epochs = spec.train.epochs
    warnings: list[str] = []

    def warn(path: tuple, text: str) -> None:
        file, line, column = spec.source.locate(path)
        where = f"{file or '<spec>'}" + (f":{line}" if line else "")
        warnings.append(f"{where}: {format_path(path)}: {text}")

    from ..train.schedule import check_rules, unfreeze_epochs

    for path, text in check_rules(spec):  # event rules: unknown groups and cycles raise here
        warn(path, text)
    starts = unfreeze_epochs(spec)  # plain epochs, and `after` chains rooted in them
    for g in spec.groups:
        where = ("groups", g.index)
        if starts[g.name] is not None and starts[g.name] >= epochs:
            warn(
                where + ("unfreeze_at",),
                f"group {g.name!r} unfreezes at epoch {starts[g.name]}, after the last "
                f"epoch ({epochs - 1}): it stays frozen for this whole run",
            )
        for start, _ in g.lr:
            if start >= epochs:
                warn(
                    where + ("lr",),
                    f"the learning-rate map of {g.name!r} names epoch {start}, past the last "
                    f"epoch ({epochs - 1}): that step never comes",
                )
    if all(g.unfreeze_at is None and g.unfreeze_rule is None for g in spec.groups):
        raise spec.error(
            ("groups",),
            "no group ever trains: every group has unfreeze_at: never",
            expected="at least one group with an unfreeze epoch",
        )
    if all(g.unfreeze_rule is None and (g.unfreeze_at is None or g.unfreeze_at >= epochs) for g in spec.groups):
        warn(("groups",), f"no group trains within the {epochs} epochs of this run")
    sched = spec.train.scheduler
    for i, m in enumerate(sched.milestones):
        if m >= epochs:
            warn(("train", "scheduler", "milestones", i), f"milestone {m} lies past the last epoch ({epochs - 1})")
    if sched.warmup_epochs >= epochs:
        warn(("train", "scheduler", "warmup_epochs"), f"the warm-up ({sched.warmup_epochs} epochs) lasts the whole run")
    _check_mixup(spec)
    _check_regularize(spec)
    _check_multi_label(spec)
    _check_class_names(spec)
    key_map, pretrained = spec.model.key_map, spec.model.pretrained
    if key_map and (pretrained is False or (key_map == "order" and not isinstance(pretrained, str))):
        raise spec.error(
            ("model", "key_map"),
            "key_map maps the keys of a weight file, and this spec loads none",
            found="pretrained: " + json.dumps(pretrained),
            expected="model.pretrained set to the path of a weight file",
            hint="remove key_map, or point model.pretrained at the file whose keys it maps",
        )
    return tuple(warnings)


def _check_regularize(spec: Spec) -> None:
    """A regulariser toward the pretrained model needs one: `pretrained: false` leaves nothing to keep."""
    terms = spec.train.regularize.needs_pretrained
    if terms and spec.model.pretrained is False:
        raise spec.error(
            ("train", "regularize", terms[0]),
            f"train.regularize.{terms[0]} pulls the model toward its pretrained weights, and this spec loads none",
            found="model.pretrained: false",
            expected="model.pretrained: true, a weight file, pkg:... or run:NAME",
            hint="l2_new (plain L2 on the new parameters) is the only term that works without pretrained weights",
        )


def _check_mixup(spec: Spec) -> None:
    mixup, train = spec.train.mixup, spec.train
    if mixup is None:
        return
    where = ("train", "mixup")
    if mixup.mixup_alpha == 0 and mixup.cutmix_alpha == 0:
        raise spec.error(
            where,
            "mixup and CutMix are both off (both alphas are 0)",
            found="mixup_alpha: 0, cutmix_alpha: 0",
            expected="mixup_alpha or cutmix_alpha above 0 (e.g. 0.8 and 1.0), or train.mixup: null",
        )
    if mixup.label_smoothing > 0 and train.label_smoothing > 0:
        raise spec.error(
            ("train", "label_smoothing"),
            "label smoothing is set twice: with mixup the mixed targets are smoothed by train.mixup.label_smoothing",
            found=str(train.label_smoothing),
            expected="train.label_smoothing: 0 with train.mixup.label_smoothing set",
            hint="keep one: train.mixup.label_smoothing",
        )
    if train.batch_size % 2:
        raise spec.error(
            ("train", "batch_size"),
            "mixup mixes each batch with itself reversed, and needs an even batch size",
            found=str(train.batch_size),
            expected=f"an even batch size, e.g. {train.batch_size + 1}",
            hint="or train.mixup: null",
        )


def _check_class_names(spec: Spec) -> None:
    from ..errors import printable
    from ..untrusted import label_problem

    for i, name in enumerate(spec.data.classes or ()):
        problem = label_problem(name) if isinstance(name, str) else None
        if problem:
            raise spec.error(
                ("data", "classes", i),
                f"the class name '{printable(name)}' {problem}",
                found=printable(name),
                expected="class names of printable characters",
            )


def _check_multi_label(spec: Spec) -> None:
    data = spec.data
    if not data.multi_label:
        return
    if data.name.lower() != "csv":
        raise spec.error(
            ("data", "multi_label"),
            "multi_label reads several classes per image from a CSV file",
            found=f"name: {data.name}",
            expected="data.name: csv (label cells such as 'cat|dog')",
            hint="or data.multi_label: false",
        )
    if spec.train.mixup is not None:
        # timm's Mixup one-hot encodes integer targets; multi-hot rows would be mixed wrongly
        raise spec.error(
            ("train", "mixup"),
            "mixup is not supported with multi-label targets",
            found="train.mixup set with data.multi_label: true",
            expected="train.mixup: null",
            hint="use data.augment for augmentation instead",
        )
    if data.balance == "sampler":
        raise spec.error(
            ("data", "balance"),
            "balance: sampler draws by one class per image; a multi-label image has several",
            found="sampler",
            expected="none or loss (loss: BCE pos_weight from the training counts)",
        )
    if data.classes is not None:
        raise spec.error(
            ("data", "classes"),
            "data.classes picks images by their one class; multi-label images have several",
            found=str(list(data.classes)),
            expected="data.classes: null",
            hint="remove the classes you do not want from the CSV's label cells",
        )


# --------------------------------------------------------------------------- entry point
def load_spec(spec: str | Path | Mapping, overrides: Sequence[str | Override] = ()) -> Spec:
    """Load, validate and type a spec.

    Args:
        spec: a path to a YAML file, or the spec as a dict (errors then carry key paths only).
        overrides: ``key.path=value`` strings applied before validation (``--set``), or parsed
            `Override`s (a sweep file's values, located on its lines).

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
        check_values(spec, Source())  # before the copy: a dict nested past the limit cannot even be copied
        data, marks, file, name = copy.deepcopy(dict(spec)), {}, None, "run"
    else:
        path = Path(spec)
        file = str(spec)
        data, marks = parse_yaml(read_spec_text(path), file)
        name = name_from_file(path, "run")
    source = Source(file, marks)
    if data is None:
        raise SpecError(
            "the spec is empty",
            file=file,
            line=1 if file else None,
            column=1 if file else None,
            expected="a mapping with at least `model: {backbone: ...}`",
        )
    data = resolve_bases(data, marks, file)  # marks now say which file each value came from
    if overrides:
        if not isinstance(data, dict):
            check_schema(data, source)
        apply_overrides(data, marks, overrides)
        if isinstance(data, dict) and BASE_KEY in data:
            raise source.error(
                (BASE_KEY,),
                "base cannot be set with --set: the bases are merged before overrides apply",
                found=quote_value(data[BASE_KEY]),
                expected="base: in the spec file",
                hint="--set the values you want instead",
            )
    check_values(data, source)
    check_schema(data, source)
    _check_entries(data, source)
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


__all__ = [
    "Spec",
    "ModelSpec",
    "HeadSpec",
    "InsertSpec",
    "LoraSpec",
    "ReplaceSpec",
    "RemoveSpec",
    "SurgeryEntry",
    "GroupSpec",
    "Selector",
    "Section",
    "TrainSpec",
    "OptimizerSpec",
    "SchedulerSpec",
    "MixupSpec",
    "RegularizeSpec",
    "DataSpec",
    "SubsetSpec",
    "AugmentSpec",
    "ErasingSpec",
    "LogSpec",
    "MlflowSpec",
    "MonitorSpec",
    "UnfreezeRule",
    "load_spec",
    "PATH_KEYS",
    "backbone_names",
]
