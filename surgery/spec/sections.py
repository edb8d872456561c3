"""The typed spec: `Spec` and its sections, frozen dataclasses read by attribute.

`load_spec` (in `surgery.spec`) is the only place that builds them, from a schema-valid mapping
with every default filled. Modules that only read a spec's types import them from here, which
imports nothing of the loading machinery (the schedule's rules are checked while loading).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from ..errors import SpecError
from .source import Source


# --------------------------------------------------------------------------- typed spec
@dataclass(frozen=True)
class Selector:
    """One pattern: a dotted glob, a named selector ('@inserted', '@head') or a module type."""

    pattern: str | None
    type: str | None
    where: tuple  # key path in the spec

    def __str__(self) -> str:
        return self.pattern if self.pattern is not None else f"{{type: {self.type}}}"


@dataclass(frozen=True)
class ModelSpec:
    backbone: str
    pretrained: bool | str
    num_classes: int | None
    args: Mapping[str, Any]
    key_map: str | Mapping[str, str] | None
    checkpoint_key: str | None
    reset_head: bool = False
    in_chans: int | None = None  # None: the backbone's own (3)
    head: "HeadSpec | None" = None

    @property
    def channels(self) -> int:
        return self.in_chans or 3

    @property
    def source(self) -> str:
        return self.backbone.split(":", 1)[0]

    @property
    def arch(self) -> str:
        return self.backbone.split(":", 1)[1]


@dataclass(frozen=True)
class InsertSpec:
    insert: str
    at: tuple[Selector, ...]
    position: str
    init: str
    args: Mapping[str, Any]
    index: int  # position in `surgery`, for errors


@dataclass(frozen=True)
class ReplaceSpec:
    """`replace: TARGET` + `with: NAME`: each matched module becomes a `with` module."""

    replace: tuple[Selector, ...]
    with_: str
    args: Mapping[str, Any]
    index: int
    allow_shape_change: bool = False  # the new module may give another output shape than the old one


@dataclass(frozen=True)
class RemoveSpec:
    """`remove: TARGET`: each matched module becomes an nn.Identity."""

    remove: tuple[Selector, ...]
    index: int


@dataclass(frozen=True)
class LoraSpec:
    """`lora: TARGET`: a low-rank update (rank, alpha / rank scaling) added to each matched Linear or
    Conv2d weight; `targets` picks q, k and/or v of a fused qkv Linear (`surgery.model.adapters`)."""

    lora: tuple[Selector, ...]
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # () for the whole layer
    index: int


SurgeryEntry = InsertSpec | ReplaceSpec | RemoveSpec | LoraSpec


@dataclass(frozen=True)
class HeadSpec:
    """`model.head`: the classifier declared instead of the backbone's own."""

    pool: str | None
    hidden: tuple[int, ...]
    dropout: float
    act: str
    norm: str

    @property
    def replaces_classifier(self) -> bool:
        return bool(self.hidden) or self.dropout > 0


@dataclass(frozen=True)
class UnfreezeRule:
    """`unfreeze_at` as an event: a plateau of a validation figure, or a delay after another group.

    after: the group this rule counts from (its actual unfreeze epoch), or None (from epoch 0).
    epochs: with `after`, the delay in epochs; None for a plateau rule.
    plateau: the watch that fires it, or None for a delay rule.
    """

    after: str | None
    epochs: int | None
    plateau: MonitorSpec | None
    where: tuple  # key path of the group's unfreeze_at, for errors

    def __str__(self) -> str:
        """As `surgery inspect --schedule` prints it: 'plateau val_loss/2', 'after new +3'."""
        if self.plateau is None:
            return f"after {self.after} +{self.epochs}"
        return (f"after {self.after}, " if self.after else "") + f"plateau {self.plateau}"


@dataclass(frozen=True)
class GroupSpec:
    name: str
    params: tuple[Selector, ...]
    lr: tuple[tuple[int, float], ...]  # piecewise constant, sorted, starts at epoch 0
    unfreeze_at: int | None  # None: never, or decided by `unfreeze_rule` during the run
    weight_decay: float | None
    decay_norm_and_bias: bool
    norm: str
    warmup_epochs: int
    index: int
    unfreeze_rule: UnfreezeRule | None = None  # an event rule; see surgery.train.schedule.Unfreezing
    layer_decay: float | None = None  # lr x layer_decay^(depth below the head); see surgery.model.groups.layer_map

    def base_lr(self, epoch: int) -> float:
        value = self.lr[0][1]
        for start, lr in self.lr:
            if epoch >= start:
                value = lr
        return value

    def trainable(self, epoch: int) -> bool:
        """From the plain `unfreeze_at` only: a group with an event rule is False here until the
        run decides (`surgery.train.schedule.Unfreezing` knows the actual epochs)."""
        return self.unfreeze_at is not None and epoch >= self.unfreeze_at


# --------------------------------------------------------------------------- typed sections
@dataclass(frozen=True)
class Section:
    """A typed, frozen spec section, read by attribute (``spec.train.epochs``); ``raw`` holds the
    mapping it was built from (defaults filled)."""

    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "Section":
        """Build from a schema-valid mapping with defaults filled; nested sections and lists too."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "raw":
                continue
            value = raw.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
            nested = f.metadata.get("section")
            if nested is not None and value is None and f.metadata.get("optional"):
                pass  # an optional section written as null (or left out): off
            elif nested is not None:
                value = nested.parse(value if value is not None else {})
            elif isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
        return cls(**values, raw=copy.deepcopy(dict(raw)))


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


def _optional_section(cls: type) -> Any:
    return field(default=None, metadata={"section": cls, "optional": True})


@dataclass(frozen=True)
class OptimizerSpec(Section):
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] | None = None
    eps: float | None = None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerSpec(Section):
    name: str = "none"
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.0
    step_size: int = 10
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    factor: float = 0.1
    patience: int = 3
    per_step: bool = False


@dataclass(frozen=True)
class MonitorSpec(Section):
    """Patience on one validation figure: a plateau unfreeze rule, or `train.early_stop`."""

    monitor: str = "val_loss"
    patience: int = 2
    min_delta: float = 0.0

    @property
    def higher_is_better(self) -> bool:
        return self.monitor != "val_loss"

    def __str__(self) -> str:
        return f"{self.monitor}/{self.patience}" + (f", min_delta {self.min_delta:g}" if self.min_delta else "")


@dataclass(frozen=True)
class MixupSpec(Section):
    """`train.mixup`: the arguments of timm's `Mixup` (batch mode)."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class LwfSpec(Section):
    """`train.regularize.lwf`: distillation of the pretrained model's outputs."""

    weight: float = 1.0
    temperature: float = 2.0


@dataclass(frozen=True)
class DistillSpec(Section):
    """`train.regularize.distill`: the student's output at a module path against the teacher's."""

    at: str = ""
    weight: float = 1.0
    loss: str = "mse"


@dataclass(frozen=True)
class RegularizeSpec(Section):
    """`train.regularize`: regularisers toward the pretrained model (all off by default)."""

    l2_sp: float = 0.0
    l2_new: float = 0.0
    lwf: LwfSpec | None = _optional_section(LwfSpec)
    distill: DistillSpec | None = _optional_section(DistillSpec)

    @property
    def needs_pretrained(self) -> tuple[str, ...]:
        """The terms that pull toward the pretrained model (every one but l2_new), by key."""
        return tuple(k for k, on in (("l2_sp", self.l2_sp > 0), ("lwf", self.lwf), ("distill", self.distill)) if on)

    @property
    def active(self) -> bool:
        return bool(self.needs_pretrained) or self.l2_new > 0


@dataclass(frozen=True)
class TrainSpec(Section):
    epochs: int = 10
    batch_size: int = 64
    accumulate: int = 1
    optimizer: OptimizerSpec = _section(OptimizerSpec)
    scheduler: SchedulerSpec = _section(SchedulerSpec)
    precision: str = "auto"
    channels_last: bool | str = "auto"
    compile: bool | str = False
    device: str = "auto"
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    mixup: MixupSpec | None = _optional_section(MixupSpec)
    ema: float | None = None
    keep_epochs: int = 0
    limit_batches: int | None = None
    nonfinite: str = "stop"
    sync_bn: bool = False
    cache_features: str = "auto"
    early_stop: MonitorSpec | None = _optional_section(MonitorSpec)
    regularize: RegularizeSpec = _section(RegularizeSpec)


@dataclass(frozen=True)
class SubsetSpec(Section):
    train: int | None = None
    val: int | None = None


@dataclass(frozen=True)
class ErasingSpec(Section):
    """`data.augment.erasing`: timm's `RandomErasing` on normalised batches on the device."""

    prob: float = 0.25
    mode: str = "pixel"


@dataclass(frozen=True)
class AugmentSpec(Section):
    """`data.augment` with its presets spelt out: 'none' (the eval transform), 'standard'
    (random resized crop and horizontal flip) or 'custom' (a mapping of the options below)."""

    preset: str = "none"
    hflip: float = 0.0
    vflip: float = 0.0
    crop: bool = False
    crop_given: bool = False  # `crop:` written explicitly (a scale with crop: false is a mistake)
    scale: tuple[float, float] | None = None
    color_jitter: float = 0.0
    rotation: float = 0.0
    randaugment: str | None = None
    erasing: ErasingSpec | None = None

    @classmethod
    def parse(cls, raw: Any) -> "AugmentSpec":
        if raw == "none":
            return cls(preset="none", raw={})
        if raw == "standard":
            return cls(preset="standard", hflip=0.5, crop=True, raw={"hflip": 0.5, "crop": True})
        options = dict(raw)
        scale = tuple(float(v) for v in options["scale"]) if "scale" in options else None
        return cls(
            preset="custom",
            hflip=float(options.get("hflip", 0.0)),
            vflip=float(options.get("vflip", 0.0)),
            crop=bool(options.get("crop", scale is not None)),
            crop_given="crop" in options,
            scale=scale,
            color_jitter=float(options.get("color_jitter", 0.0)),
            rotation=float(options.get("rotation", 0.0)),
            randaugment=options.get("randaugment"),
            erasing=ErasingSpec.parse(options["erasing"]) if "erasing" in options else None,
            raw=options,
        )


@dataclass(frozen=True)
class DataSpec(Section):
    name: str = "digits"
    root: str | None = None
    download: bool = False
    image_size: int = 32
    classes: tuple[str | int, ...] | None = None
    val_split: float = 0.2
    test_split: float = 0.0  # of the training pool, after val is set aside: a held-out test set
    subset: SubsetSpec = _section(SubsetSpec)
    augment: AugmentSpec = _section(AugmentSpec)
    balance: str = "none"
    num_workers: int = 2
    multi_label: bool = False
    label_separator: str = "|"
    threshold: float = 0.5


@dataclass(frozen=True)
class MlflowSpec(Section):
    """`log.mlflow` as a mapping (`true` is this with its defaults)."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a local store in the run directory
    experiment: str = "surgery"


@dataclass(frozen=True)
class LogSpec(Section):
    """`log`: trackers besides metrics.jsonl and metrics.csv, which every run writes (`surgery.train.trackers`)."""

    tensorboard: bool = False
    mlflow: MlflowSpec | None = None  # None: off

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "LogSpec":
        mlflow = raw.get("mlflow")
        on = mlflow is True or isinstance(mlflow, Mapping)
        return cls(
            tensorboard=bool(raw.get("tensorboard", False)),
            mlflow=MlflowSpec.parse(mlflow if isinstance(mlflow, Mapping) else {}) if on else None,
            raw=copy.deepcopy(dict(raw)),
        )


@dataclass(frozen=True)
class Spec:
    """A validated spec with every default filled in. `raw` is that same content as plain data."""

    name: str
    seed: int
    model: ModelSpec
    surgery: tuple[SurgeryEntry, ...]
    groups: tuple[GroupSpec, ...]
    train: TrainSpec
    data: DataSpec
    raw: Mapping[str, Any]
    source: Source
    default_groups: bool  # True when the spec declared no groups
    warnings: tuple[str, ...] = ()  # located notes on settings that are legal but probably unintended
    log: LogSpec = field(default_factory=LogSpec)

    def error(self, path: Sequence, problem: str, **kw: Any) -> SpecError:
        return self.source.error(path, problem, **kw)

    def resolve_path(self, value: str, key: Sequence = ()) -> Path:
        """A path written in the spec: relative to the folder of the file that wrote it (a base
        file's own folder for a value inherited from it), or to the working directory when it was
        given on the command line (`--set key=path`)."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        origin = self.source.origin(tuple(key)) if key else None
        if origin is not None and origin.kind == "flag":
            return Path.cwd() / p
        if origin is not None and origin.kind == "file":
            return Source(origin.name).folder / p
        return self.source.folder / p

    def resolved_raw(self) -> dict[str, Any]:
        """`raw` with every path-valued key (`PATH_KEYS`) absolute, so the spec loads the same files
        from any folder: a relative path is read where the file that wrote it lies (`resolve_path`),
        and a copy of the spec elsewhere would read it somewhere else. `run:NAME` (a folder of runs,
        not of files) and `pkg:` sources, URIs and true/false stay as written."""
        out = json.loads(json.dumps(self.raw))
        for key, is_path in PATH_KEYS:
            parent = out
            for part in key[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            value = parent.get(key[-1]) if isinstance(parent, dict) else None
            if isinstance(value, str) and is_path(value):
                parent[key[-1]] = os.path.normpath(self.resolve_path(value, key).absolute())
        return out

    def to_yaml(self) -> str:
        """The resolved spec as YAML (`resolved_raw`): what a run keeps as spec.yaml and
        `surgery validate --show-resolved` prints; it loads on its own from any folder."""
        return yaml.safe_dump(self.resolved_raw(), sort_keys=False, allow_unicode=True)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
# key path -> which of its string values are file paths (the rest: sources, URIs, names)
PATH_KEYS: tuple[tuple[tuple[str, ...], Callable[[str], bool]], ...] = (
    (("data", "root"), lambda v: True),
    (("model", "pretrained"), lambda v: not v.startswith(("run:", "pkg:"))),
    (("log", "mlflow", "tracking_uri"), lambda v: v != "databricks" and not _URI.match(v)),
)
