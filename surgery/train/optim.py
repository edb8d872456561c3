"""The optimizer: every spec group becomes optimizer param groups once, at the start of the run.

Frozen groups are in the optimizer from the first step (Lightning's lesson: build every group at
the start and flip ``requires_grad``; never ``add_param_group`` mid-run, which breaks schedulers
and resume). A frozen parameter has ``requires_grad=False`` and therefore ``grad is None``, and
every optimizer we build skips parameters without a gradient: no update, no weight decay, no
momentum or moment state. torch's SGD, Adam and AdamW collect only ``p.grad is not None`` in
``_init_group``; timm's optimizers ``continue`` on ``p.grad is None``; ``tests/test_optim.py``
checks both. So unfreezing is only ``requires_grad_(True)``: the optimizer is never rebuilt and
its state (step counts, moments) starts fresh for the newly trained parameters.

Each spec group is split in two param groups, with and without weight decay (timm's convention,
as in ``timm.optim.param_groups_weight_decay``): biases, 1-D parameters, parameters of
normalization layers and names the model lists in ``no_weight_decay()`` get none, unless the
group sets ``decay_norm_and_bias`` (the model's own ``no_weight_decay()`` list still wins). Every
param group carries ``"group"`` (the spec group's name), ``"decay"`` (bool) and ``"param_names"``
(torch keeps these in ``optimizer.state_dict()``), so `set_lrs` can address spec groups.

A group with ``layer_decay`` is split once more, by layer (`surgery.model.groups.layer_map`):
each param group also carries ``"layer"`` and ``"lr_scale"``, and `set_lrs` gives it its spec
group's lr times ``lr_scale``, so every schedule, warm-up, plateau factor and lr-find sweep moves
all layers of a group together and keeps their ratios. The scale lives in the optimizer's
state dict, so a resumed run gets it back with the rest.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import SpecError, did_you_mean
from ..model.groups import NORM_TYPES
from .schedule import lr_at

if TYPE_CHECKING:  # pragma: no cover
    from ..model.groups import ResolvedGroup
    from ..spec import OptimizerSpec, Spec, TrainSpec

# Our names with torch semantics. timm's own 'sgd' is nesterov SGD; ours follows the spec's
# `momentum` and `nesterov` keys, so these three never go through timm's registry.
_TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}

# Optimizer settings that have their own key in the spec, so they may not hide in `args`.
_OWN_KEYS: dict[str, str] = {
    "params": "the resolver decides the parameters",
    "lr": "set train.optimizer.lr, or lr in a group",
    "weight_decay": "set train.optimizer.weight_decay, or weight_decay in a group",
    "momentum": "set train.optimizer.momentum",
    "nesterov": "set train.optimizer.nesterov",
    "betas": "set train.optimizer.betas",
    "eps": "set train.optimizer.eps",
}

_LOOKAHEAD = "lookahead_"
_WHERE = ("train", "optimizer")  # the key path of every optimizer error


def _error(spec: Spec | None, path: tuple, problem: str, **kw: Any) -> SpecError:
    """A SpecError located in the spec file when we have the spec, else carrying the key path only."""
    return spec.error(path, problem, **kw) if spec is not None else SpecError(problem, path=path, **kw)


def _split_name(name: str) -> tuple[bool, str]:
    """'lookahead_adamw' -> (True, 'adamw'), as timm's create_optimizer_v2 reads it."""
    name = name.lower()
    if name.startswith(_LOOKAHEAD):
        return True, name[len(_LOOKAHEAD) :]
    return False, name


def optimizer_names() -> list[str]:
    """Every optimizer name a spec may use: sgd, adam, adamw and timm's registry (each also with a
    ``lookahead_`` prefix, which wraps it in timm's Lookahead)."""
    import timm.optim

    return sorted(set(_TORCH_OPTIMIZERS) | set(timm.optim.list_optimizers()))


def _timm_info(name: str) -> Any:
    import timm.optim

    return timm.optim.get_optimizer_info(name)


def check_optimizer(train: TrainSpec, *, spec: Spec | None = None) -> None:
    """Check ``train.optimizer`` against the optimizers installed here, before anything is built.

    `build_optimizer` calls this itself; call it earlier (during validation, with the spec) to get
    errors located at their line in the spec file.

    Args:
        train: ``spec.train``.
        spec: when given, errors carry the spec's file, line and column.

    Raises:
        SpecError: an unknown name (with "did you mean"), a second-order optimizer, an optimizer
            whose package is missing, nesterov without momentum, betas or eps given to an
            optimizer without them, or an ``args`` key that has its own place or that the
            optimizer does not take.

    Example:
        >>> check_optimizer(load_spec({"model": {"backbone": "timm:resnet18"},
        ...                            "train": {"optimizer": {"name": "lamb"}}}).train)
    """
    opt = train.optimizer
    _, name = _split_name(opt.name)
    # --- the optimizer: known, first-order, its package installed
    cls, has_betas, has_eps = _resolve_optimizer(opt, name, spec)
    # --- its settings: nesterov with a momentum, betas and eps only where it has them
    _check_settings(opt, name, has_betas, has_eps, spec)
    # --- its args: none with a place of its own in the spec, none it does not take
    _check_args(opt, name, cls, spec)


def _resolve_optimizer(opt: OptimizerSpec, name: str, spec: Spec | None) -> tuple[Any, bool, bool]:
    """The optimizer class (None where it is imported on use), and whether it has betas and eps."""
    known = optimizer_names()
    if name not in known:
        raise _error(
            spec,
            _WHERE + ("name",),
            "unknown optimizer",
            found=repr(opt.name),
            expected="sgd, adam, adamw or a name from timm.optim.list_optimizers()",
            hint=did_you_mean(name, known),
        )
    if name in _TORCH_OPTIMIZERS:
        return _TORCH_OPTIMIZERS[name], name != "sgd", name != "sgd"
    info = _timm_info(name)
    if info.second_order:
        raise _error(
            spec,
            _WHERE + ("name",),
            f"{name} is a second-order optimizer",
            found=repr(opt.name),
            expected="a first-order optimizer: the training loop does not backward with create_graph",
        )
    cls = info.opt_class
    if isinstance(cls, str):  # apex / bitsandbytes: named, imported on use
        package = cls.split(".")[0]
        if importlib.util.find_spec(package) is None:
            plain = name.removeprefix("bnb").removeprefix("fused").removesuffix("8bit")
            hint = f"install {package}" + (f", or use {plain!r}" if plain in known else "")
            raise _error(
                spec,
                _WHERE + ("name",),
                f"{name} needs the package {package!r}, which is not installed",
                found=repr(opt.name),
                expected="an optimizer that is available here",
                hint=hint,
            )
        cls = None
    return cls, info.has_betas, info.has_eps


def _check_settings(opt: OptimizerSpec, name: str, has_betas: bool, has_eps: bool, spec: Spec | None) -> None:
    """nesterov needs a momentum; betas and eps only for an optimizer that has them."""
    if name == "sgd" and opt.nesterov and opt.momentum == 0:
        raise _error(
            spec,
            _WHERE + ("nesterov",),
            "nesterov momentum needs a momentum",
            found="momentum: 0",
            expected="momentum > 0, or nesterov: false",
        )
    for key, present in (("betas", has_betas), ("eps", has_eps)):
        if getattr(opt, key) is not None and not present:
            raise _error(
                spec,
                _WHERE + (key,),
                f"{name} has no {key}",
                found=repr(getattr(opt, key)),
                expected=f"no `{key}:` for {name}",
            )


def _check_args(opt: OptimizerSpec, name: str, cls: Any, spec: Spec | None) -> None:
    """`args`: no setting that has its own key in the spec, and (where `cls` is known) only what it takes."""
    args = opt.args or {}
    for key in args:
        if key in _OWN_KEYS:
            raise _error(
                spec,
                _WHERE + ("args", key),
                f"{key!r} has its own place in the spec",
                found=repr(key),
                expected="optimizer-specific settings only",
                hint=_OWN_KEYS[key],
            )
    if cls is not None:
        accepted = _accepted_kwargs(cls)
        if accepted is not None:
            for key in args:
                if key not in accepted:
                    raise _error(
                        spec,
                        _WHERE + ("args", key),
                        f"{name} takes no argument {key!r}",
                        found=repr(key),
                        expected="one of " + ", ".join(sorted(accepted - set(_OWN_KEYS))),
                        hint=did_you_mean(key, accepted),
                    )


def _accepted_kwargs(cls: Any) -> set[str] | None:
    """Keyword arguments of an optimizer class, or None when it takes **kwargs (anything goes)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"params"}


# Fused kernels do the whole update in one pass over each tensor. On CUDA that saves kernel
# launches; on the CPU it is the bigger win: for a ResNet18, one Adam step takes 7 ms fused
# against 33-55 ms on the default foreach path (2-core Xeon, torch 2.14), a quarter of a
# 32 px training step.
_FUSED_DEVICES = ("cuda", "cpu")


def optimizer_kwargs(opt: OptimizerSpec, device_type: str) -> dict[str, Any]:
    """Constructor keywords (all but the params) for ``train.optimizer`` on `device_type`.

    sgd, adam and adamw go to torch's classes; other names to ``timm.optim.create_optimizer_v2``,
    which passes `momentum` only to optimizers that have one. On CUDA and the CPU, torch's fused
    kernels replace the default foreach path for sgd, adam and adamw; elsewhere (MPS) torch picks
    its default. A ``fused`` or ``foreach`` in ``args`` wins.
    """
    _, name = _split_name(opt.name)
    args = dict(opt.args or {})
    kwargs: dict[str, Any] = {"lr": opt.lr}  # each param group overrides it with its own lr
    if name == "sgd":
        kwargs.update(momentum=opt.momentum, nesterov=opt.nesterov)
    elif name not in _TORCH_OPTIMIZERS:
        kwargs["momentum"] = opt.momentum
    if opt.betas is not None:
        kwargs["betas"] = tuple(opt.betas)
    if opt.eps is not None:
        kwargs["eps"] = opt.eps
    if name in _TORCH_OPTIMIZERS and device_type in _FUSED_DEVICES and not {"fused", "foreach"} & set(args):
        kwargs["fused"] = True
    kwargs.update(args)
    return kwargs


def _no_decay(name: str, param: torch.Tensor, owner_is_norm: bool) -> bool:
    return param.ndim <= 1 or name.rpartition(".")[2] == "bias" or owner_is_norm


def build_param_groups(
    model: nn.Module,
    groups: Sequence[ResolvedGroup],
    train: TrainSpec,
    no_decay: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The optimizer's param groups: per spec group, one with weight decay and one without; a
    group with ``layer_decay`` has that pair for each of its layers (``layer`` its id,
    ``lr_scale`` its factor ``layer_decay ** (top - layer)``).

    Frozen groups are included. Empty halves are left out. The lr of each is the group's lr at
    epoch 0 (`surgery.train.schedule.lr_at`) times its ``lr_scale``; the training loop sets it
    again every epoch or step through `set_lrs`, which keeps the factor.

    Args:
        model: the surgered model.
        groups: the resolved groups, every parameter of `model` in exactly one.
        train: ``spec.train``.
        no_decay: parameter names that get no weight decay whatever their group says (the
            pretrained parameters under ``train.regularize.l2_sp``, which pulls them toward w0).

    Returns:
        Dicts with ``params``, ``param_names``, ``lr``, ``weight_decay``, ``group``, ``decay``,
        ``layer`` (-1 without layer_decay) and ``lr_scale`` (1 without), in group order, within a
        group the top layer first (as timm's ``param_groups_layer_decay``), the decayed half first.

    Raises:
        ValueError: when `groups` name an unknown parameter, one parameter twice, or miss one
            (a resolver bug, not a spec mistake).
    """
    named = dict(model.named_parameters())
    norm_modules = {path for path, module in model.named_modules() if isinstance(module, NORM_TYPES)}
    for g in groups:
        norm_modules.update(g.norm_modules)
    # timm models list parameters that must never decay (position embeddings, class tokens)
    never_decay = tuple(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else ()
    default_wd = train.optimizer.weight_decay
    owner: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for g in groups:
        wd = g.spec.weight_decay if g.spec.weight_decay is not None else default_wd
        parts: dict[tuple[int, bool], list[str]] = {}
        for name in g.params:
            if name not in named:
                raise ValueError(f"group {g.name!r} names {name!r}, which is not a parameter of the model")
            if name in owner:
                raise ValueError(f"parameter {name!r} is in two groups: {owner[name]!r} and {g.name!r}")
            owner[name] = g.name
            if name in no_decay or any(fnmatch.fnmatchcase(name, pattern) for pattern in never_decay):
                decay = False
            elif g.spec.decay_norm_and_bias:
                decay = True
            else:
                decay = not _no_decay(name, named[name], name.rpartition(".")[0] in norm_modules)
            parts.setdefault((g.layer_of(name), decay), []).append(name)
        lr, scales = lr_at(g.spec, train, 0.0), g.lr_scales()
        # the top layer first, as timm's param groups; decayed before not decayed within a layer
        for layer, decay in sorted(parts, key=lambda k: (-k[0], not k[1])):
            names = parts[(layer, decay)]
            out.append(
                {
                    "params": [named[n] for n in names],
                    "param_names": list(names),
                    "lr": lr * scales[layer],
                    "weight_decay": wd if decay else 0.0,
                    "group": g.name,
                    "decay": decay,
                    "layer": layer,
                    "lr_scale": scales[layer],
                }
            )
    unowned = [n for n in named if n not in owner]
    if unowned:
        raise ValueError(f"{len(unowned)} parameters are in no group, e.g. {unowned[:3]}")
    return out


def build_optimizer(
    model: nn.Module,
    groups: Sequence[ResolvedGroup],
    train: TrainSpec,
    *,
    device_type: str = "cpu",
    spec: Spec | None = None,
    no_decay: frozenset[str] = frozenset(),
) -> torch.optim.Optimizer:
    """Build the run's one optimizer, frozen groups included (see the module docstring).

    Args:
        model: the surgered model, already on its device (fused kernels need the params there).
        groups: the resolved groups.
        train: ``spec.train``.
        device_type: ``torch.device(...).type``; ``"cuda"`` turns on fused sgd/adam/adamw.
        spec: when given, settings errors point at their line in the spec file.
        no_decay: parameter names kept out of weight decay (see `build_param_groups`).

    Returns:
        A torch optimizer whose param groups carry ``"group"`` and ``"decay"``; drive its lrs with
        `set_lrs`. For ``lookahead_<name>`` it is timm's Lookahead (alpha 0.5, k 6) around
        ``<name>``, which gets ``args``.

    Raises:
        SpecError: see `check_optimizer`, or settings the optimizer itself rejects.

    Example:
        >>> optimizer = build_optimizer(built.model, built.groups, spec.train, spec=spec)
        >>> set_lrs(optimizer, lrs_at(spec, epoch))
    """
    check_optimizer(train, spec=spec)
    param_groups = build_param_groups(model, groups, train, no_decay)
    opt = train.optimizer
    lookahead, name = _split_name(opt.name)
    kwargs = optimizer_kwargs(opt, device_type)
    try:
        if name in _TORCH_OPTIMIZERS:
            optimizer = _TORCH_OPTIMIZERS[name](param_groups, **kwargs)
        else:
            import timm.optim

            optimizer = timm.optim.create_optimizer_v2(param_groups, opt=name, **kwargs)
    except (TypeError, ValueError, ImportError) as exc:
        raise _error(
            spec,
            ("train", "optimizer"),
            f"{name} rejects these settings: {exc}",
            found=", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
            expected=f"settings that {name} accepts",
        ) from exc
    if lookahead:
        import timm.optim

        optimizer = timm.optim.Lookahead(optimizer)
    return optimizer


def set_lrs(optimizer: torch.optim.Optimizer, lrs: Mapping[str, float]) -> None:
    """Set the lr of every param group from its spec group's name.

    Args:
        optimizer: built by `build_optimizer`.
        lrs: lr by spec group name, e.g. ``surgery.train.schedule.lrs_at(spec, t, plateau.current)``;
            each param group gets it times its ``lr_scale`` (layer_decay's factor, else 1).

    Raises:
        KeyError: a param group whose spec group is not in `lrs`.
    """
    for pg in optimizer.param_groups:
        name = pg.get("group")
        if name not in lrs:
            raise KeyError(f"no lr for group {name!r}; lrs has {sorted(lrs)}")
        lr = lrs[name] * pg.get("lr_scale", 1.0)  # layer_decay: the layer's share of its group's lr
        if isinstance(pg["lr"], torch.Tensor):  # fused/capturable optimizers may hold lr as a tensor
            pg["lr"].fill_(lr)
        else:
            pg["lr"] = float(lr)


def layer_lrs(groups: Sequence[ResolvedGroup], lrs: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The lr of every layer of each group with ``layer_decay``, as `set_lrs` gives them.

    Args:
        groups: the resolved groups.
        lrs: lr by spec group name (`surgery.train.schedule.lrs_at`).

    Returns:
        ``{group: {"layer id": lr}}``, top layer first; empty when no group has layer_decay.
        metrics.jsonl keeps it as ``layer_lr`` (trackers: ``layer_lr/GROUP/ID``).

    Example:
        >>> layer_lrs(built.groups, {"head": 0.01, "body": 0.001})  # body: layer_decay 0.5
        {'body': {'8': 0.0005, '7': 0.00025, ...}}
    """
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        if g.spec.layer_decay is not None and g.layers is not None:
            scales = g.lr_scales()
            out[g.name] = {str(i): lrs[g.name] * scales[i] for i in sorted(scales, reverse=True)}
    return out


__all__ = ["build_optimizer", "build_param_groups", "check_optimizer", "layer_lrs", "optimizer_names", "set_lrs"]
