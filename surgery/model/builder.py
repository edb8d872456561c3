"""Compile a spec into a surgered, pretrained model: build -> probe -> plan -> apply -> groups -> load."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import describe_exception, quote_value
from ..spec import Spec
from .adapters import Adapter, adapter_keys, apply_adapters
from .backbones import Backbone, create_backbone, culprit_arg, logits_switch
from .groups import ResolvedGroup, resolve_groups
from .insert import Insertion, Shapes, apply_surgery, fake_tensors, inserted_paths, probe
from .modes import in_mode
from .plan import Plan, plan_operations
from .replace import Change
from .weights import LoadReport, load_weights, read_weight_file


@dataclass
class Built:
    """The result of `build`: the surgered model and every fact about how it was made.

    model: the surgered `nn.Module` (train mode, on the CPU).
    report: the `LoadReport` (what was loaded, re-initialised, new, unused).
    groups: the `ResolvedGroup`s, every parameter in exactly one.
    head: module paths of the classifier head; inserted: the `Insertion`s applied;
    changes: the modules replaced, removed or adapted (`replace.Change`), in order.
    adapters: the LoRA adapters attached (`adapters.Adapter`), in order.
    shapes: input/output shape of every module on a probe of `input_size`, after surgery.
    train_output: the type name of the train-mode forward's result (checked to be a tensor).
    notes: what was decided for the user (e.g. googlenet's aux_logits turned off).
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
    train_output: str = "Tensor"
    notes: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    adapters: list[Adapter] = field(default_factory=list)

    def group_of(self) -> dict[str, str]:
        """Parameter name -> group name."""
        return {p: g.name for g in self.groups for p in g.params}


def probe_size(spec: Spec, backbone: Backbone) -> tuple[int, int, int]:
    size = spec.data.image_size
    return (3, size, size)


def _fails_with(spec: Spec, size: Sequence[int], check) -> bool:
    # does the backbone built from this spec fail `check(model, size)`? (to blame one of model.args)
    try:
        with torch.random.fork_rng(devices=[]):
            check(create_backbone(spec, fetch=False).model, size)
    except Exception:  # noqa: BLE001 - a failure of any kind
        return True
    return False


def _blame(spec: Spec, size: Sequence[int], check) -> tuple:
    """Where a failure of the backbone on a probe comes from: one of model.args, or the image size."""
    return culprit_arg(spec, lambda s: _fails_with(s, size, check)) or ("data", "image_size")


def _located(spec: Spec, where: tuple, problem: str, size: Sequence[int]) -> Exception:
    if where[:2] == ("model", "args"):
        key = where[2] if len(where) == 3 else None
        return spec.error(
            where,
            f"with model.args{'.' + key if key else ''} {problem}",
            found=f"{key}: {quote_value(spec.model.args[key])}" if key else repr(dict(spec.model.args)),
            expected=f"a value of {key} that {spec.model.backbone} runs with"
            if key
            else f"arguments that {spec.model.backbone} runs with",
            hint="the backbone runs on this input without it" if key else None,
        )
    return spec.error(where, problem, found=f"input {list(size)}", expected="an image size the backbone accepts")


def _probe(spec: Spec, model: nn.Module, size: Sequence[int], when: str) -> dict[str, Shapes]:
    try:
        return probe(model, size)
    except Exception as exc:  # noqa: BLE001 - the model's own error is the most useful detail
        problem = f"the {when} fails on a {list(size)} input: {describe_exception(exc, 300)}"
        if when == "backbone":  # a model argument (drop_rate: 2) or the image size: find which
            raise _located(spec, _blame(spec, size, probe), problem, size) from None
        raise spec.error(
            ("surgery",),
            problem,
            found=f"input {list(size)}",
            expected="inserted modules that keep the feature map's shape",
        ) from None


_REAL_PASS_LIMIT = 1 << 26  # input elements: a bigger input is only run on fake tensors


def train_output(model: nn.Module, input_size: Sequence[int]) -> Any:
    """What the model returns in train mode on a batch of 2: the type the training loop receives.

    Shapes only where fake tensors can run the model, else a real pass; either way BatchNorm
    statistics, train/eval modes and the RNG are left as they were.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), in_mode(model, train=True):
            try:
                with fake_tensors():  # the input is made inside: fake too
                    return model(torch.zeros(2, *input_size, dtype=dtype))
            except Exception:  # noqa: BLE001 - the real pass below decides, at sizes that fit in memory
                if 2 * math.prod(input_size) > _REAL_PASS_LIMIT:
                    raise
                return model(torch.zeros(2, *input_size, dtype=dtype))
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)


def _check_train_output(spec: Spec, model: nn.Module, size: Sequence[int]) -> str:
    try:
        out = train_output(model, size)
    except Exception as exc:  # noqa: BLE001 - eval mode ran: a train-only branch (aux heads) fails
        problem = (
            f"the backbone fails in train mode on a batch of 2 {list(size)} inputs: {describe_exception(exc, 300)}"
        )
        err = _located(spec, _blame(spec, size, train_output), problem, size)
        switch = logits_switch(spec)
        if switch and switch not in spec.model.args and err.hint is None:
            err.hint = (
                f"its auxiliary classifier runs in train mode only and needs a larger input; "
                f"set model.args.{switch}: false to build the model without it"
            )
        raise err from None
    if isinstance(out, torch.Tensor):
        return "Tensor"  # a FakeTensor from the shape-only pass is a tensor all the same

    def structured(candidate: nn.Module, size: Sequence[int]) -> None:
        if not isinstance(train_output(candidate, size), torch.Tensor):
            raise TypeError("not a tensor")

    where = culprit_arg(spec, lambda s: _fails_with(s, size, structured)) or ("model", "backbone")
    kind = type(out).__name__
    problem = (
        f"in train mode {spec.model.backbone} returns a {kind}, not a logits tensor; "
        "the training loop trains on one logits tensor"
    )
    if len(where) == 3:
        return_hint = f"remove model.args.{where[2]} (or set it so the model returns logits only)"
        raise spec.error(
            where,
            problem,
            found=f"{where[2]}: {quote_value(spec.model.args[where[2]])}",
            expected="model arguments under which the train-mode forward returns one tensor",
            hint=return_hint,
        )
    raise spec.error(
        where,
        problem,
        found=kind,
        expected="a backbone whose train-mode forward returns one tensor",
        hint="set the model.args that turn off extra outputs (auxiliary or distillation heads), "
        "or pick another backbone",
    )


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
            raise spec.error(
                ("model", "pretrained"),
                f"the package {package!r} is not installed",
                found=value,
                expected="pkg:<installed package>/<file inside it>",
                hint=f"pip install the package that provides {package!r} ({exc.__class__.__name__})",
            ) from None
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
    # --- backbone, probed, and the plan of its surgery; the weights to load
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        backbone = create_backbone(spec, fetch=state_dict is None)  # given weights: fetch none
        model = backbone.model
        size = probe_size(spec, backbone)
        shapes = _probe(spec, model, size, "backbone")
        output_type = _check_train_output(spec, model, size)
        plan = plan_operations(spec, model, shapes, backbone.head, size)
        state, source = _weights_to_load(spec, backbone, state_dict, runs_root)
        original = model.state_dict()
        if plan.model is None:
            apply_surgery(model, plan.inserts)
            apply_adapters(model, plan.adapters)
        else:
            model = plan.model
    # --- surgery applied: groups, then the weights, every tensor accounted for
    _check_no_key_lost(original, model, plan.changes)
    inserted = inserted_paths(model)
    groups = resolve_groups(spec, model, inserted=inserted, head=backbone.head)
    report = _empty_report(spec, plan)
    # weights given directly are this model's own (a run's model.safetensors): its head is the trained one
    load_weights(
        spec,
        model,
        state,
        source,
        head=backbone.head,
        inserted=inserted + adapter_keys(model),  # adapter tensors are new, like an inserted module's
        report=report,
        reset_head=spec.model.reset_head and state_dict is None,
        changes=plan.changes,
        original=original,
    )
    # --- the surgered model probed once more
    size = plan.input_size
    after = _probe(spec, model, size, "surgered model") if plan.inserts or plan.changes or plan.adapters else shapes
    model.train()
    return Built(
        spec=spec,
        model=model,
        report=report,
        groups=groups,
        head=backbone.head,
        inserted=plan.inserts,
        data_config=dict(backbone.data_config),
        num_classes=backbone.num_classes,
        input_size=tuple(size),
        shapes=after,
        train_output=output_type,
        notes=list(backbone.notes),
        changes=plan.changes,
        adapters=plan.adapters,
    )


def _weights_to_load(
    spec: Spec, backbone: Backbone, state_dict: Mapping[str, torch.Tensor] | None, runs_root: Path | None
) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """The state to load and where it came from: given, a weight file, or the backbone's own pretrained weights."""
    if state_dict is not None:
        return dict(state_dict), "given state_dict"
    if isinstance(spec.model.pretrained, str):
        path = weights_path(spec, runs_root)
        return read_weight_file(spec, path), str(path)
    return backbone.pretrained, backbone.pretrained_from


def _check_no_key_lost(original: Mapping[str, Any], model: nn.Module, changes: Sequence[Change]) -> None:
    """Surgery only adds, save where an entry replaces: a lost key is a bug in surgery, never a user mistake."""
    surgered_keys = set(model.state_dict())
    changed = tuple(c.path for c in changes)
    lost = [k for k in original if k not in surgered_keys and not any(k.startswith(p + ".") for p in changed)]
    if lost:
        raise RuntimeError(f"surgery renamed or dropped backbone keys: {lost[:5]}")


def _empty_report(spec: Spec, plan: Plan) -> LoadReport:
    """The load report before loading: the user classes imported, the modules inserted and changed."""
    return LoadReport(
        imports=[s.insert for s in spec.surgery if ":" in getattr(s, "insert", "")]
        + [s.with_ for s in spec.surgery if ":" in getattr(s, "with_", "")],
        inserted_modules=[i.describe() for i in plan.inserts],
        changed_modules=[c.describe() for c in plan.changes],
        adapters=[a.describe() for a in plan.adapters],
    )
