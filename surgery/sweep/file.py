"""The sweep file: a base spec, values applied to every variant, and the axes and ranges to search.

    name: cbam-digits              # the sweep's folder (runs/cbam-digits) and Optuna study; default: file stem
    spec: quickstart.yaml          # the base spec, relative to this file
    set:                           # applied to every variant, like --set
      train.epochs: 3
    sweep:
      axes:                        # key path: a list of values, or a mapping label: value
        surgery.0.at: {l4: [layer4], l34: [layer3, layer4], all: "layer*"}
        seed: [0, 1]               # `seed` repeats a variant: its label leaves the seed out
      sampler: grid                # grid (every combination) | random | tpe
      trials: 20                   # random and tpe: how many variants to try
      ranges:                      # random and tpe: numbers drawn between low and high
        groups.0.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      objective: best_val_acc      # a summary.json figure; maximised (minimised for losses)
      heartbeat: {interval: 20, grace: 60}
      prune: {pruner: successive_halving, min_epochs: 1, reduction_factor: 3}   # Optuna's pruners

`load_sweep` reads it into a frozen `Sweep` once, with every mistake located (file, line, key);
nothing here imports torch or Optuna. Key paths are those of ``--set``: ``surgery.0.at``, or the
bracket form ``surgery[0].at``. Each variant becomes a list of `Override`s whose origin is the
sweep file's line, so a value that the spec rejects is reported where the sweep file wrote it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import Origin, SpecError, did_you_mean, quote_value
from ..spec.schema import check_schema, check_values, schema
from ..spec.source import Override, Source, name_from_file, parse_key_path, parse_yaml, read_spec_text

# summary.json figures a sweep can optimise, and which way
OBJECTIVES: dict[str, str] = {
    "best_val_acc": "maximize",
    "final_val_acc": "maximize",
    "final_val_loss": "minimize",
    "val_macro_f1": "maximize",
    "best_val_map": "maximize",  # data.multi_label
    "final_val_map": "maximize",  # data.multi_label
}
SAMPLERS = ("grid", "random", "tpe")  # schema.json's $defs/sweep: sampler (a test holds the two together)
PRUNERS = ("successive_halving", "hyperband", "median", "none")  # schema.json's $defs/sweep_prune: pruner
SEED_AXIS = ("seed",)  # an axis over the spec's seed repeats a variant: its label leaves the seed out
MAX_VARIANTS = 10_000
MAX_NAME = 200  # a variant's run directory name (file systems allow 255 bytes)


@dataclass(frozen=True)
class Axis:
    """One key path and the values a variant takes there, each with the label used in names."""

    key: str  # dotted: surgery.0.at
    path: tuple
    short: str  # its part of a variant's name: the last name in the path, or the whole key if ambiguous
    labels: tuple[str, ...]
    values: tuple[Any, ...]
    origins: tuple[Origin, ...]  # where each value was written

    def choice(self, label: str) -> tuple[Any, Origin]:
        i = self.labels.index(label)
        return self.values[i], self.origins[i]


@dataclass(frozen=True)
class Range:
    """A number drawn between `low` and `high` (random and tpe): an integer when both ends are."""

    key: str
    path: tuple
    low: float
    high: float
    log: bool
    step: float | None
    integer: bool
    origin: Origin


@dataclass(frozen=True)
class Prune:
    """Which of Optuna's pruners stops unpromising variants early, and its settings (epochs are
    its steps: a run reports its objective after each epoch)."""

    pruner: str = "none"
    min_epochs: int = 1
    reduction_factor: int = 3
    startup_trials: int = 5

    @property
    def on(self) -> bool:
        return self.pruner != "none"

    def settings(self) -> dict[str, Any]:
        """The pruner and the settings it reads (sweep.json; the study's fingerprint)."""
        return {"pruner": self.pruner, **{k: getattr(self, k) for k in _PRUNER_SETTINGS[self.pruner]}}


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: its run directory's name, the label it is compared under (the name
    without the seed), the Optuna params that pick it, and the overrides that make its spec."""

    name: str
    label: str
    params: Mapping[str, Any]
    overrides: tuple[Override, ...]
    seed: int | None


@dataclass(frozen=True)
class Sweep:
    name: str
    file: str
    spec: Path
    set: tuple[Override, ...]
    axes: tuple[Axis, ...]
    ranges: tuple[Range, ...]
    sampler: str
    trials: int
    objective: str
    sampler_seed: int
    heartbeat: int
    grace: int
    source: Source
    prune: Prune = Prune()

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def grid(self) -> list[Variant]:
        """Every combination of the axes' values, in the order the file lists them."""
        combos = itertools.product(*(axis.labels for axis in self.axes))
        return [self.variant({axis.key: label for axis, label in zip(self.axes, combo)}) for combo in combos]

    def variant(self, params: Mapping[str, Any], name: str | None = None) -> Variant:
        """The variant `params` (axis labels and drawn numbers, by key) pick. A grid variant is
        named by its labels; a random or tpe one by `name` (its first trial's, ``trial-0007``)."""
        overrides: list[Override] = []
        seed = None
        for axis in self.axes:
            value, origin = axis.choice(params[axis.key])
            overrides.append(Override(axis.path, value, origin))
            if axis.path == SEED_AXIS:
                seed = value
        for r in self.ranges:
            overrides.append(Override(r.path, params[r.key], r.origin))
        parts = [(axis, f"{axis.short}-{params[axis.key]}") for axis in self.axes]
        label = "_".join(part for axis, part in parts if axis.path != SEED_AXIS) or "base"
        if name is None:
            name = "_".join(part for _, part in parts)
        else:
            label = name
        overrides.append(Override(("name",), name, self.source.origin(("name",))))
        return Variant(name=name, label=label, params=dict(params), overrides=tuple(overrides), seed=seed)

    def definition(self) -> dict[str, Any]:
        """What the sweep tries, as plain data (sweep.json; the study's fingerprint)."""
        return {
            "name": self.name,
            "spec": str(self.spec),
            "sampler": self.sampler,
            "trials": self.trials,
            "objective": self.objective,
            "direction": self.direction,
            "sampler_seed": self.sampler_seed,
            "set": {".".join(map(str, o.path)): o.value for o in self.set},
            "axes": {a.key: dict(zip(a.labels, a.values)) for a in self.axes},
            "ranges": {
                r.key: {"low": r.low, "high": r.high, "log": r.log, "step": r.step, "integer": r.integer}
                for r in self.ranges
            },
            # without a pruner the definition (and so the fingerprint of existing studies) is unchanged
            **({"prune": self.prune.settings()} if self.prune.on else {}),
        }


def fingerprint(definition: Mapping[str, Any], base: Mapping[str, Any], overrides: Sequence[str]) -> str:
    """A hash of everything that decides the variants: the sweep's definition, the base spec as
    loaded (defaults filled, `set:` applied) and the command line's --set. A study made from
    another one refuses to be continued."""
    what = {k: v for k, v in definition.items() if k != "spec"}  # the base spec's path may be written another way
    text = json.dumps({"sweep": what, "base": base, "overrides": list(overrides)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
SWEEP_ONLY_KEYS = ("spec", "sweep")  # top-level keys a sweep file has and a spec never does


def is_sweep_file(path: str | Path) -> bool:
    """Is this a sweep file rather than a spec (by its keys)? False for a file that cannot be
    read or parsed: loading it as a spec says what is wrong."""
    try:
        data, _ = parse_yaml(read_spec_text(Path(path), "spec"), str(path))
    except SpecError:
        return False
    return isinstance(data, dict) and "model" not in data and any(k in data for k in SWEEP_ONLY_KEYS)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file: its JSON Schema (schema.json's ``$defs/sweep_file``, worded
    and located like a spec's), then the rules between its fields.

    Raises:
        SpecError: located at the file, line and key of the mistake (a variant's spec is checked
            later, by `load_spec` on each variant, against the same lines).
    """
    path = Path(path)
    file = str(path)
    data, marks = parse_yaml(read_spec_text(path, "sweep"), file)
    source = Source(file, marks)
    check_values(data, source, "sweep")
    check_schema(data, source, "sweep")
    body = data["sweep"]
    name = data.get("name", name_from_file(path, "sweep"))
    spec = _base_spec(data, source)
    sampler, objective = body.get("sampler", _default("sampler")), body.get("objective", _default("objective"))
    axes = _axes(body, source)
    ranges = _ranges(body, source, sampler)
    seen = {a.path: a.key for a in axes}
    for r in ranges:
        if r.path in seen:
            raise SpecError(
                f"{r.key} is an axis and a range",
                path=("sweep", "ranges", r.key),
                origin=r.origin,
                found=f"axes: {seen[r.path]} and ranges: {r.key}",
                expected="one of the two",
            )
    if not axes and not ranges:
        raise source.error(
            ("sweep",),
            "the sweep varies nothing",
            found="no axes and no ranges",
            expected="sweep: {axes: {KEY.PATH: [values...]}} (or ranges, with sampler random or tpe)",
        )
    trials = _trials(body, source, sampler, axes)
    longest = sum(len(a.short) + 2 + max(map(len, a.labels)) for a in axes)
    if sampler == "grid" and longest > MAX_NAME:  # a variant's name is a folder's
        raise source.error(
            ("sweep", "axes"),
            f"variant names would be up to {longest} characters long",
            found="long values or key paths",
            expected=f"names of at most {MAX_NAME} characters",
            hint="label the values: KEY.PATH: {short-label: value, ...}",
        )
    heartbeat, grace = _heartbeat(body, source)
    sweep_set = tuple(
        Override(p, v, source.origin(("set", k))) for k, p, v in _key_paths(data.get("set"), ("set",), source)
    )
    return Sweep(
        name=name,
        file=file,
        spec=spec,
        set=sweep_set,
        axes=axes,
        ranges=ranges,
        sampler=sampler,
        trials=trials,
        objective=objective,
        sampler_seed=body.get("sampler_seed", _default("sampler_seed")),
        heartbeat=heartbeat,
        grace=grace,
        source=source,
        prune=_prune(body, source),
    )


def _default(key: str, section: str = "sweep") -> Any:
    return schema("sweep")["$defs"][section]["properties"][key]["default"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _base_spec(data: dict, source: Source) -> Path:
    value = data["spec"]
    path = Path(source.file).parent / value  # as written, relative to where the command runs
    if not path.is_file():
        hint = (
            did_you_mean(Path(value).name, [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")])
            if path.parent.is_dir()
            else None
        )
        raise source.error(
            ("spec",),
            "the base spec does not exist",
            found=str(path),
            expected="a spec file, relative to the sweep file's folder",
            hint=hint,
        )
    return path


def _key_paths(mapping: Any, at: tuple, source: Source) -> list[tuple[str, tuple, Any]]:
    """(key as normalised, key path, value) for each entry of a `KEY.PATH: value` mapping."""
    if mapping is None:  # the schema says what each is; an absent one is empty
        return []
    out, seen = [], {}
    for key, value in mapping.items():
        path = parse_key_path(key)
        if path is None or not isinstance(path[0], str):
            raise source.error(
                at + (key,),
                "this is not a key path",
                found=repr(key),
                expected="dotted keys as in --set: train.epochs, surgery.0.at (or surgery[0].at)",
            )
        dotted = ".".join(map(str, path))
        if dotted in seen:
            raise source.error(
                at + (key,),
                f"{dotted} is given twice",
                found=f"{seen[dotted]!r} and {key!r}",
                expected="each key path once",
            )
        seen[dotted] = key
        out.append((key, path, value))
    return out


def _auto_label(value: Any) -> str:
    """`layer4` -> layer4, [layer3, layer4] -> layer3+layer4, 1.0e-3 -> 0.001, 'layer*' -> layer."""
    if isinstance(value, list):
        return "+".join(_auto_label(v) for v in value)
    if isinstance(value, dict):
        return ""  # no good name: the axis must label its values
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.+")


def _axes(body: dict, source: Source) -> tuple[Axis, ...]:
    entries = _key_paths(body.get("axes"), ("sweep", "axes"), source)
    shorts = [next((p for p in reversed(path) if isinstance(p, str))) for _, path, _ in entries]
    axes = []
    for (key, path, values), short in zip(entries, shorts):
        at = ("sweep", "axes", key)
        dotted = ".".join(map(str, path))
        if isinstance(values, dict):  # the schema: labels of letters, digits, '.', '+', '-'; at least one
            labels = [str(k) for k in values]
            items = list(values.values())
            origins = [source.origin(at + (k,)) for k in values]
        else:  # a list (the schema: of at least one value)
            items = values
            labels = [_auto_label(v) for v in values]
            origins = [source.origin(at + (i,)) for i in range(len(values))]
            clash = next(((i, j) for i in range(len(labels)) for j in range(i) if labels[i] == labels[j]), None)
            if "" in labels or clash:
                i = labels.index("") if "" in labels else clash[0]
                problem = (
                    "these values give no name for a run directory"
                    if "" in labels
                    else f"two values would share the run directory name {labels[i]!r}"
                )
                raise source.error(
                    at + (i,),
                    problem,
                    found=quote_value(values[i]),
                    expected="a label for each value: write the axis as a mapping, e.g. "
                    f"{key}: {{first: ..., second: ...}}",
                )
        axes.append(
            Axis(
                key=dotted,
                path=path,
                short=short if shorts.count(short) == 1 else dotted,
                labels=tuple(labels),
                values=tuple(items),
                origins=tuple(origins),
            )
        )
    return tuple(axes)


def _ranges(body: dict, source: Source, sampler: str) -> tuple[Range, ...]:
    entries = _key_paths(body.get("ranges"), ("sweep", "ranges"), source)
    if entries and sampler == "grid":
        raise source.error(
            ("sweep", "ranges"),
            "a grid cannot draw from ranges",
            found="sampler: grid",
            expected="sampler: random or tpe, or list the values as an axis",
        )
    out = []
    for key, path, spec in entries:  # the schema: numbers low and high, log true or false, step > 0
        at = ("sweep", "ranges", key)
        low, high, log, step = (
            spec["low"],
            spec["high"],
            spec.get("log", _default("log", "sweep_range")),
            spec.get("step"),
        )
        if not low < high:
            raise source.error(
                at + ("high",),
                "a range's high must be above its low",
                found=f"low {low}, high {high}",
                expected=f"a number above {low}",
            )
        if log and low <= 0:
            raise source.error(at + ("low",), "a log range starts above zero", found=str(low), expected="low > 0")
        if step is not None and log:
            raise source.error(
                at + ("step",),
                "a step is for a range without log",
                found=quote_value(step),
                expected="step > 0 and log: false",
            )
        integer = _is_int(low) and _is_int(high) and (step is None or _is_int(step))
        out.append(
            Range(
                key=".".join(map(str, path)),
                path=path,
                low=low,
                high=high,
                log=log,
                step=step,
                integer=integer,
                origin=source.origin(at),
            )
        )
    return tuple(out)


def _trials(body: dict, source: Source, sampler: str, axes: Sequence[Axis]) -> int:
    trials = body.get("trials")
    if sampler == "grid":
        if trials is not None:
            raise source.error(
                ("sweep", "trials"),
                "a grid tries every combination: `trials` is for random and tpe",
                found=f"trials: {quote_value(trials)}",
                expected="no `trials`, or sampler: random or tpe",
            )
        size = 1
        for axis in axes:
            size *= len(axis.labels)
        if size > MAX_VARIANTS:
            raise source.error(
                ("sweep", "axes"),
                f"the grid has {size:,} variants",
                found=f"{size:,} combinations",
                expected=f"at most {MAX_VARIANTS:,}",
                hint="use sampler: random or tpe with a trial budget",
            )
        return size
    if trials is None:  # the schema: an integer from 1 to MAX_VARIANTS, when given
        raise source.error(
            ("sweep",),
            f"sampler {sampler} needs a trial budget",
            found=quote_value(trials),
            expected=f"trials: an integer from 1 to {MAX_VARIANTS:,}",
        )
    return trials


# which settings each pruner reads (a setting another pruner reads is refused, not ignored)
_PRUNER_SETTINGS = {
    "successive_halving": ("min_epochs", "reduction_factor"),
    "hyperband": ("min_epochs", "reduction_factor"),
    "median": ("min_epochs", "startup_trials"),
    "none": (),
}


def _prune(body: dict, source: Source) -> Prune:
    value = body.get("prune", {})  # the schema: a known pruner, integers in range
    at = ("sweep", "prune")
    pruner = value.get("pruner", _default("pruner", "sweep_prune"))
    for key in value:
        if key != "pruner" and key not in _PRUNER_SETTINGS[pruner]:
            readers = [p for p, keys in _PRUNER_SETTINGS.items() if key in keys]
            raise source.error(
                at + (key,),
                f"pruner {pruner} has no setting {key}",
                found=f"{key}: {quote_value(value[key])} with pruner: {pruner}",
                expected=(f"{', '.join(_PRUNER_SETTINGS[pruner])}" if _PRUNER_SETTINGS[pruner] else "no settings")
                + f" ({key} is read by {' and '.join(readers)})",
            )
    keys = ("min_epochs", "reduction_factor", "startup_trials")
    settings = {k: value.get(k, _default(k, "sweep_prune")) for k in keys}
    return Prune(pruner=pruner, **settings)


def _heartbeat(body: dict, source: Source) -> tuple[int, int]:
    value = body.get("heartbeat", {})  # the schema: whole numbers of seconds
    at = ("sweep", "heartbeat")
    interval = value.get("interval", _default("interval", "sweep_heartbeat"))
    grace = value.get("grace", 3 * interval)
    if grace <= interval:
        raise source.error(
            at + ("grace",),
            "the grace period must outlast the heartbeat interval",
            found=f"interval {interval}, grace {grace}",
            expected=f"grace > {interval} (e.g. {3 * interval})",
            hint="a worker is declared dead when it has sent no heartbeat for `grace` seconds",
        )
    return interval, grace


__all__ = [
    "Sweep",
    "Axis",
    "Range",
    "Variant",
    "Prune",
    "OBJECTIVES",
    "SAMPLERS",
    "PRUNERS",
    "load_sweep",
    "is_sweep_file",
    "fingerprint",
]
