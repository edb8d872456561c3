"""Compile a spec into a surgered, pretrained model: build -> probe -> plan -> apply -> groups -> load."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .backbones import Backbone, create_backbone
from .groups import ResolvedGroup, resolve_groups
from .insert import Insertion, Shapes, apply_surgery, inserted_paths, plan_surgery, probe
from .spec import Spec
from .weights import LoadReport, load_weights, read_weight_file


@dataclass
class Built:
    """The result of `build`: the surgered model and every fact about how it was made.

    model: the surgered `nn.Module` (train mode, on the CPU).
    report: the `LoadReport` (what was loaded, re-initialised, new, unused).
    groups: the `ResolvedGroup`s, every parameter in exactly one.
    head: module paths of the classifier head; inserted: the `Insertion`s applied.
    shapes: input/output shape of every module on a probe of `input_size`, after surgery.
    """

    spec: Spec
    model: nn.Module
    report: LoadReport
    groups: list[ResolvedGroup]
    head: tuple[str, ...]
    inserted: list[Insertion]
    data_config: dict[str, Any]
    num_classes: int
    input_size: tuple[int, int, int]
    shapes: dict[str, Shapes] = field(default_factory=dict)

    def group_of(self) -> dict[str, str]:
        """Parameter name -> group name."""
        return {p: g.name for g in self.groups for p in g.params}


def probe_size(spec: Spec, backbone: Backbone) -> tuple[int, int, int]:
    size = spec.data.image_size
    return (3, size, size)


def _probe(spec: Spec, model: nn.Module, size: Sequence[int], when: str) -> dict[str, Shapes]:
    try:
        return probe(model, size)
    except Exception as exc:  # noqa: BLE001 - the model's own error is the most useful detail
        where = ("data", "image_size") if when == "backbone" else ("surgery",)
        raise spec.error(where, f"the {when} fails on a {list(size)} input: {exc.__class__.__name__}: {str(exc)[:300]}",
                         found=f"input {list(size)}",
                         expected="an image size the backbone accepts" if when == "backbone" else
                         "inserted modules that keep the feature map's shape") from None


def weights_path(spec: Spec, runs_root: Path | None = None) -> Path:
    """The weight file `model.pretrained` names.

    A path relative to the spec's folder; `run:NAME`, the model.safetensors of an earlier run in
    `runs_root`; or `pkg:PACKAGE/FILE`, a file shipped inside an installed Python package.
    """
    value = str(spec.model.pretrained)
    if value.startswith("run:"):
        return Path(runs_root or "runs") / value[4:] / "model.safetensors"
    if value.startswith("pkg:"):
        package, _, inner = value[4:].partition("/")
        try:
            from importlib import resources

            return Path(str(resources.files(package).joinpath(inner)))
        except (ModuleNotFoundError, TypeError) as exc:
            raise spec.error(("model", "pretrained"), f"the package {package!r} is not installed", found=value,
                             expected="pkg:<installed package>/<file inside it>",
                             hint=f"pip install the package that provides {package!r} ({exc.__class__.__name__})") from None
    return spec.resolve_path(value, ("model", "pretrained"))


def build(spec: Spec, *, state_dict: Mapping[str, torch.Tensor] | None = None, runs_root: Path | None = None) -> Built:
    """Build the backbone, insert the spec's modules, resolve groups and load the weights.

    Args:
        spec: from `load_spec`.
        state_dict: weights of the surgered model to load instead of `model.pretrained`
            (for example a run's `model.safetensors`); every key must fit.
        runs_root: the folder `pretrained: run:NAME` looks in (default `runs`).

    Returns:
        A `Built`. Two builds of one spec give identical models (initialisation is seeded by `spec.seed`).

    Raises:
        SpecError: anything in the spec that does not fit the real model, before it is returned.

    Example:
        >>> built = build(load_spec({"model": {"backbone": "torchvision:resnet18", "num_classes": 10},
        ...                          "surgery": [{"insert": "cbam", "at": "layer*"}]}))
        >>> [i.path for i in built.inserted]
        ['layer1.cbam_after', 'layer2.cbam_after', 'layer3.cbam_after', 'layer4.cbam_after']
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        backbone = create_backbone(spec, fetch=state_dict is None)  # given weights: fetch none
        model = backbone.model
        size = probe_size(spec, backbone)
        shapes = _probe(spec, model, size, "backbone")
        plan = plan_surgery(spec, model, shapes, backbone.head)
        if state_dict is not None:
            state, source = dict(state_dict), "given state_dict"
        elif isinstance(spec.model.pretrained, str):
            path = weights_path(spec, runs_root)
            state, source = read_weight_file(spec, path), str(path)
        else:
            state, source = backbone.pretrained, backbone.pretrained_from
        original_keys = list(model.state_dict())
        apply_surgery(model, plan)
    surgered_keys = set(model.state_dict())
    lost = [k for k in original_keys if k not in surgered_keys]
    if lost:  # surgery only adds: a lost key is a bug in surgery, never a user mistake
        raise RuntimeError(f"surgery renamed or dropped backbone keys: {lost[:5]}")
    inserted = inserted_paths(model)
    groups = resolve_groups(spec, model, inserted=inserted, head=backbone.head)
    report = LoadReport(imports=[s.insert for s in spec.surgery if ":" in s.insert],
                        inserted_modules=[i.describe() for i in plan])
    # weights given directly are this model's own (a run's model.safetensors): its head is the trained one
    load_weights(spec, model, state, source, head=backbone.head, inserted=inserted, report=report,
                 reset_head=spec.model.reset_head and state_dict is None)
    after = _probe(spec, model, size, "surgered model") if plan else shapes
    model.train()
    return Built(spec=spec, model=model, report=report, groups=groups, head=backbone.head, inserted=plan,
                 data_config=dict(backbone.data_config), num_classes=backbone.num_classes,
                 input_size=tuple(size), shapes=after)
