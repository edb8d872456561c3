"""Surgery that changes keys: replace a module, remove one, adapt the input channels, declare a head.

Each operation builds its new module from facts, never from a guess: the channel and feature
counts a new class needs come from the old module's attributes (num_features, in_channels, ...)
or from the shape probe; its other arguments that the old module also has (eps, kernel_size,
stride, ...) are carried over unless `args` sets them. A `Change` records what was done at
which path and by which spec entry, so that `weights.load_weights` can name the spec line
responsible for every tensor it keeps, adapts, re-initialises or drops.
"""

from __future__ import annotations

import copy
import inspect as _inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import describe_exception, did_you_mean, quote_value
from ..spec import ReplaceSpec, Spec
from .insert import Shapes

# constructor parameters that mean "the channels coming in" / "going out", across torch.nn and timm
_IN_NAMES = (
    "num_features",
    "num_channels",
    "channels",
    "in_channels",
    "in_features",
    "in_chs",
    "chs",
    "num_chs",
    "dim",
    "normalized_shape",
)
_OUT_NAMES = ("out_channels", "out_features", "out_chs")
# what the old module calls them, in the order asked
_OLD_IN = ("num_features", "num_channels", "in_channels", "in_features", "channels", "normalized_shape", "dim")
_OLD_OUT = ("out_channels", "out_features", "num_features", "num_channels", "channels", "normalized_shape")
# other arguments carried over from the old module when both have them (a conv keeps its stride)
_CARRIED = (
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
    "inplace",
    "output_size",
    "ceil_mode",
    "elementwise_affine",
)
# arguments that set the output's size: written in `args` with a value other than the old
# module's, they declare that the output changes (a CIFAR stem's stride: 1)
_GEOMETRY = (
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "output_size",
    "ceil_mode",
    "out_channels",
    "out_features",
    "out_chs",
    "num_features",
    "num_channels",
    "normalized_shape",
)
_DECLARING = ("stride", "padding", "dilation", "output_size", "ceil_mode", "out_channels", "out_features", "out_chs")


@dataclass
class Change:
    """One module replaced, removed or adapted: the facts the load report and `inspect` need.

    kind: 'replace', 'remove', 'in_chans', 'head' or 'pool'. where: the spec key path responsible;
    label: words for what was done ("surgery[0] (line 7): replace layer1.0.bn1 BatchNorm2d with GroupNorm").
    """

    kind: str
    path: str
    where: tuple
    label: str
    old_type: str
    new_type: str
    module: nn.Module = field(repr=False)
    in_chans: int = 3

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "old": self.old_type, "new": self.new_type, "by": self.label}


def entry_label(spec: Spec, where: tuple) -> str:
    """`surgery[2] (line 14)` for a spec key path: the words every report line names its cause with."""
    from ..errors import format_path

    _, line, _ = spec.source.locate(where)
    return format_path(where) + (f" (line {line})" if line else "")


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _type_name(module: nn.Module) -> str:
    from .paths import type_names

    return type_names(module)[0]


# --------------------------------------------------------------------------- which class
def _module_classes(module: Any) -> dict[str, type]:
    return {
        n: v
        for n, v in vars(module).items()
        if isinstance(v, type) and issubclass(v, nn.Module) and not n.startswith("_")
    }


def _libraries() -> tuple[Any, ...]:
    import timm.layers
    import torchvision.ops

    return (nn, timm.layers, torchvision.ops)


def _known_names() -> list[str]:
    return sorted({n for lib in _libraries() for n in _module_classes(lib)})


def resolve_class(spec: Spec, item: ReplaceSpec) -> type:
    """The class `with:` names: torch.nn first, then timm.layers, then torchvision.ops (FrozenBatchNorm2d),
    or a dotted / 'package.module:Class' path."""
    where = ("surgery", item.index, "with")
    name = item.with_
    if ":" in name or "." in name:
        module_name, _, class_name = name.partition(":") if ":" in name else name.rpartition(".")
        from .user_code import import_user_module

        module = import_user_module(
            spec,
            where,
            module_name,
            found=name,
            expected="an importable module: 'torchvision.ops.FrozenBatchNorm2d' or 'package.module:Class'",
            hint=did_you_mean(name, _known_names()),
        )
        cls = getattr(module, class_name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
        raise spec.error(
            where,
            f"{module_name} has no nn.Module class {class_name!r}",
            found=name,
            expected="an nn.Module subclass",
            hint=did_you_mean(class_name, list(_module_classes(module))),
        )
    for module in _libraries():
        cls = _module_classes(module).get(name)
        if cls is not None:
            return cls
    raise spec.error(
        where,
        f"neither torch.nn, timm.layers nor torchvision.ops has a module class {name!r}",
        found=name,
        expected="a torch.nn class (GroupNorm, SiLU, Conv2d), a timm layer, "
        "torchvision.ops.FrozenBatchNorm2d or 'package.module:Class'",
        hint=did_you_mean(name, _known_names()),
    )


# --------------------------------------------------------------------------- constructor arguments
def _old_width(module: nn.Module, names: Sequence[str], shape: tuple[int, ...] | None) -> int | None:
    """The width the old module was built for: its own attributes first (a LayerNorm's
    normalized_shape, a conv's in_channels), the probe only when none tells."""
    from .insert import channels_last

    for n in names:
        value = getattr(module, n, None)
        if isinstance(value, (tuple, list)) and len(value) == 1:
            value = value[0]  # normalized_shape (192,)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if shape is None or len(shape) < 2:
        return None
    if len(shape) == 3 or (len(shape) == 4 and channels_last(module, shape)):
        return int(shape[-1])  # (batch, tokens, features) and (batch, height, width, channels) maps
    return int(shape[1])  # channels-first maps and (batch, features) vectors


def _carried(module: nn.Module, name: str) -> Any:
    value = getattr(module, name, None)
    if name == "bias" and isinstance(module, (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d)):
        return module.bias is not None
    if isinstance(value, (int, float, bool, str, tuple)) and value is not None:
        return value
    return None


def constructor_args(
    spec: Spec, item: ReplaceSpec, cls: type, old: nn.Module, shapes: Shapes | None, target: str
) -> dict[str, Any]:
    """Arguments for `cls` at `target`: `args` as written, widths from the old module or the probe,
    and the old module's own values of arguments both classes have."""
    try:
        signature = _inspect.signature(cls)
    except (TypeError, ValueError):
        return dict(item.args)
    params = signature.parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in item.args if k not in params and not accepts_any]
    if unknown:
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise spec.error(
            ("surgery", item.index, "args", unknown[0]),
            f"{cls.__name__} takes no argument {unknown[0]!r}",
            found=unknown[0],
            expected=f"arguments of {cls.__name__}{signature}",
            hint=did_you_mean(unknown[0], names),
        )
    args = dict(item.args)
    inputs = shapes.inputs if shapes is not None and shapes.calls != 0 else None
    output = shapes.output if shapes is not None and shapes.calls != 0 else None
    for name, p in params.items():
        if name in args or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = None
        if name == "normalized_shape" and isinstance(getattr(old, "normalized_shape", None), tuple):
            value = old.normalized_shape  # a norm over several trailing dims keeps them all
        elif name in _IN_NAMES:
            value = _old_width(old, _OLD_IN, inputs)
        elif name in _OUT_NAMES:
            value = _old_width(old, _OLD_OUT, output)
        elif name in _CARRIED:
            value = _carried(old, name)
            if name == "padding" and value is not None:
                value = _padding_for(spec, item, old, value, target)
        if value is not None:
            args[name] = value
        elif p.default is p.empty:
            raise spec.error(
                ("surgery", item.index, "args"),
                f"{cls.__name__} needs {name!r}, which {target} ({_type_name(old)}) does not tell",
                found=quote_value(dict(item.args)),
                expected=f"args.{name} (arguments of {cls.__name__}{signature})",
                hint=_needs_hint(name, old, inputs),
            )
    return args


def _as_tuple(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _padding_for(spec: Spec, item: ReplaceSpec, old: nn.Module, padding: Any, target: str) -> Any:
    """The old module's padding, made to fit the kernel `args` sets: padding is chosen for a kernel
    size (3x3 with padding 1 keeps the map's size), so a new kernel_size (or dilation) gets the
    padding that keeps the old alignment, p + (d'(k'-1) - d(k-1)) / 2, or an error naming it."""
    if isinstance(padding, str) or not any(k in item.args for k in ("kernel_size", "dilation")):
        return padding  # 'same' / 'valid' fit any kernel; the same kernel keeps its padding
    k_old = getattr(old, "kernel_size", None)
    if k_old is None:
        return padding
    n = len(k_old) if isinstance(k_old, tuple) else 1
    d_old = _as_tuple(getattr(old, "dilation", 1), n)
    k_new = _as_tuple(item.args.get("kernel_size", k_old), n)
    d_new = _as_tuple(item.args.get("dilation", d_old), n)
    p_old = _as_tuple(padding, n)
    try:
        twice = [
            2 * p + dn * (kn - 1) - do * (ko - 1)
            for p, kn, dn, ko, do in zip(p_old, k_new, d_new, _as_tuple(k_old, n), d_old)
        ]
    except TypeError:
        return padding  # not numbers: the constructor says what it makes of them
    if all(t >= 0 and t % 2 == 0 for t in twice):
        new = tuple(t // 2 for t in twice)
        return new if isinstance(padding, tuple) or n > 1 and len(set(new)) > 1 else new[0]
    key = "kernel_size" if "kernel_size" in item.args else "dilation"
    raise spec.error(
        ("surgery", item.index, "args", key),
        f"the padding of {target}, {quote_value(padding)}, was chosen for its {quote_value(k_old)} kernel; "
        f"no padding keeps its output size with {key} {quote_value(item.args[key])}",
        found=f"{key}: {quote_value(item.args[key])}",
        expected="an odd kernel size when the old one is odd (the padding is then recomputed), or args.padding set",
        hint="set args.padding, and allow_shape_change: true if the output size may change",
    )


def _needs_hint(name: str, old: nn.Module, inputs: tuple[int, ...] | None) -> str | None:
    if name in ("num_groups", "groups") and inputs is not None and len(inputs) >= 2:
        c = int(inputs[1])
        fits = [d for d in (32, 16, 8, 4, 2, 1) if c % d == 0][:3]
        return f"set args.{name} to a divisor of its {c} channels, e.g. " + " or ".join(map(str, fits))
    return f"set args.{name}"


def build_replacement(
    spec: Spec, item: ReplaceSpec, cls: type, old: nn.Module, shapes: Shapes | None, target: str
) -> nn.Module:
    args = constructor_args(spec, item, cls, old, shapes, target)
    try:
        module = cls(**args)
    except Exception as exc:  # noqa: BLE001 - a class that cannot be built from these arguments is a spec problem
        raise spec.error(
            ("surgery", item.index, "args" if item.args else "with"),
            f"{cls.__name__} cannot be built for {target}: {describe_exception(exc, 300)}",
            found=quote_value(args),
            expected=f"arguments that {cls.__name__} accepts for this module",
        ) from None
    if not isinstance(module, nn.Module):
        raise spec.error(
            ("surgery", item.index, "with"),
            f"{item.with_} did not build an nn.Module",
            found=type(module).__name__,
            expected="an nn.Module",
        )
    # a replacement trains, or not, as the module it replaces did (eval-only classes aside)
    module.train(old.training)
    _check_output(spec, item, cls, old, module, args, shapes, target)
    return module


def _differing(item: ReplaceSpec, cls: type, old: nn.Module, args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, words) for each geometry argument where the new module is not the old one, saying
    where its value came from."""
    out = []
    for name in _GEOMETRY:
        mine = getattr(old, name, None)
        if mine is None or isinstance(mine, (nn.Module, torch.Tensor)):
            continue
        if name not in args:
            neutral = (0, (0, 0)) if name == "padding" else (1, (1, 1))
            if name in ("padding", "dilation") and name not in _params(cls) and mine not in neutral:
                out.append((name, f"{name} {quote_value(mine)} ({cls.__name__} has no {name})"))
            continue
        n = len(mine) if isinstance(mine, tuple) else 1
        if _as_tuple(args[name], n) != _as_tuple(mine, n):
            origin = (
                "in args" if name in item.args else "recomputed for the new kernel" if name == "padding" else "carried"
            )
            out.append((name, f"{name} {quote_value(mine)} -> {quote_value(args[name])} ({origin})"))
    return out


def _params(cls: type) -> Mapping[str, Any]:
    try:
        return _inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}


def _check_output(
    spec: Spec,
    item: ReplaceSpec,
    cls: type,
    old: nn.Module,
    new: nn.Module,
    args: Mapping[str, Any],
    shapes: Shapes | None,
    target: str,
) -> None:
    """The new module, run on the map the old one took, gives the map the old one gave, unless the
    spec says it may not (`allow_shape_change`, or a geometry argument written in `args`)."""
    from .insert import _run_on
    from .modes import evaluating

    if shapes is None or shapes.calls <= 0 or shapes.inputs is None or shapes.output is None:
        return  # never called, or called with several shapes: the re-probe after the entry decides
    where = ("surgery", item.index)
    try:
        with evaluating(new), torch.no_grad():
            got = _run_on(new, shapes.inputs)
    except Exception as exc:  # noqa: BLE001 - whatever it raises, the replaced module is where it fails
        raise spec.error(
            where + ("args" if item.args else "with",),
            f"{cls.__name__} fails on the input of {target}, a {list(shapes.inputs)} map: "
            f"{describe_exception(exc, 300)}",
            found=quote_value(args),
            expected=f"a {cls.__name__} that takes what {target} ({_type_name(old)}) took",
            hint=f"{target} took {list(shapes.inputs)} and gave {list(shapes.output)}",
        ) from None
    if not isinstance(got, tuple) or got == tuple(shapes.output) or item.allow_shape_change:
        return
    differ = _differing(item, cls, old, args)
    if any(name in item.args and name in _DECLARING for name, _ in differ):
        return  # a geometry argument written in args: the user asked for another output
    raise spec.error(
        where + ("with",),
        f"{cls.__name__} at {target} gives {list(got)} where {_type_name(old)} gave "
        f"{list(shapes.output)} (on its {list(shapes.inputs)} input)",
        found="; ".join(words for _, words in differ)
        or f"{cls.__name__}({', '.join(f'{k}={quote_value(v)}' for k, v in args.items())})",
        expected=f"a replacement with {target}'s output shape, {list(shapes.output)}",
        hint=f"`remove: {target}` takes it out on purpose"
        if cls is nn.Identity
        else "set the arguments that differ in args, or allow_shape_change: true on this entry "
        "if the model should change there",
    )


def kept_keys(old: nn.Module, new: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Local tensor names of `new` that `old` has with the same shape, and why the others are not."""
    before = {k: tuple(v.shape) for k, v in old.state_dict().items()}
    kept, fresh = [], {}
    for k, v in new.state_dict().items():
        if before.get(k) == tuple(v.shape):
            kept.append(k)
        elif k in before:
            fresh[k] = f"shape {list(v.shape)} here, {list(before[k])} in the old module"
        else:
            fresh[k] = "the old module has no such tensor"
    return kept, fresh


# --------------------------------------------------------------------------- input channels
def first_conv(model: nn.Module, shapes: Mapping[str, Shapes]) -> str | None:
    """The first convolution run on the model's input (3 channels in), by the probe's call order."""
    candidates = []
    for path, module in model.named_modules():
        sh = shapes.get(path)
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, nn.Conv2d)
            and sh is not None
            and sh.inputs is not None
            and len(sh.inputs) == 4
            and sh.inputs[1] == 3
            and isinstance(weight, torch.Tensor)
            and weight.shape[1] == 3
        ):
            candidates.append((sh.start, path))
    return min(candidates)[1] if candidates else None


def adapt_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of `conv` reading `in_chans` channels, its filters adapted as timm's adapt_input_conv does."""
    from timm.models._manipulate import adapt_input_conv

    new = copy.deepcopy(conv)
    new.in_channels = in_chans
    new.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.detach()).contiguous())
    return new


def adapt_tensor(tensor: torch.Tensor, in_chans: int) -> torch.Tensor:
    from timm.models._manipulate import adapt_input_conv

    return adapt_input_conv(in_chans, tensor).contiguous()


# --------------------------------------------------------------------------- heads
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def main_classifier(model: nn.Module, head: Sequence[str], shapes: Mapping[str, Shapes]) -> str | None:
    """The classifier a declared head replaces: the last nn.Linear of the head run on (batch, features)."""
    found = None
    for path in head:
        module = model.get_submodule(path)
        sh = shapes.get(path)
        if isinstance(module, nn.Linear) and sh is not None and sh.inputs is not None and len(sh.inputs) == 2:
            found = path
    return found


def global_pool(model: nn.Module, shapes: Mapping[str, Shapes], classifier: str) -> str | None:
    """The global pooling run last before `classifier`: torchvision's avgpool, timm's global_pool."""
    from timm.layers import SelectAdaptivePool2d

    here = shapes[classifier]
    found = None
    for path, module in model.named_modules():
        sh = shapes.get(path)
        # global only: VGG's AdaptiveAvgPool2d((7, 7)) feeds a flattened 7x7 map, not a vector
        is_global = sh is not None and sh.output is not None and (len(sh.output) == 2 or tuple(sh.output[2:]) == (1, 1))
        if isinstance(module, (*_POOLS, SelectAdaptivePool2d)) and is_global and 0 <= sh.end <= here.start:
            if found is None or sh.end > shapes[found].end:
                found = path
    return found


def local_pool(model: nn.Module, shapes: Mapping[str, Shapes], classifier: str) -> str | None:
    """The adaptive pooling run last before `classifier` when it is not global (VGG's AdaptiveAvgPool2d((7, 7)))."""
    from timm.layers import SelectAdaptivePool2d

    here = shapes[classifier]
    found = None
    for path, module in model.named_modules():
        sh = shapes.get(path)
        if isinstance(module, (*_POOLS, SelectAdaptivePool2d)) and sh is not None and 0 <= sh.end <= here.start:
            if found is None or sh.end > shapes[found].end:
                found = path
    return found


def build_pool(pool: str, old_output: tuple[int, ...] | None) -> nn.Module:
    from timm.layers import SelectAdaptivePool2d

    return SelectAdaptivePool2d(pool_type=pool, flatten=old_output is not None and len(old_output) == 2)


def build_head(spec: Spec, in_features: int, num_classes: int) -> nn.Sequential:
    """Linear, norm, act for each hidden width; dropout; the final Linear."""
    head = spec.model.head
    layers: list[nn.Module] = []
    width = in_features
    for h in head.hidden:
        layers.append(nn.Linear(width, h))
        if head.norm == "batch":
            layers.append(nn.BatchNorm1d(h))
        elif head.norm == "layer":
            layers.append(nn.LayerNorm(h))
        layers.append(_ACTS[head.act]())
        width = h
    if head.dropout > 0:
        layers.append(nn.Dropout(head.dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


__all__ = [
    "Change",
    "resolve_class",
    "constructor_args",
    "build_replacement",
    "kept_keys",
    "first_conv",
    "adapt_conv",
    "adapt_tensor",
    "main_classifier",
    "global_pool",
    "local_pool",
    "build_pool",
    "build_head",
    "entry_label",
    "set_module",
]
