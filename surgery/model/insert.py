"""Surgery: insert attention modules before or after modules of a backbone, renaming nothing.

Match first, mutate later: `plan_surgery` resolves every target on the unmodified backbone,
reads channel counts from a shape probe (a dry forward pass, never a neighbouring layer's
attribute) and builds every module; only then does `apply_surgery` attach them.

Where an inserted module goes, so that every original state_dict key survives:
- target is a plain `nn.Sequential`: the module joins it, first (before) or last (after):
  `layer1` -> `layer1.cbam_after`;
- any other module: it becomes a child of the target, and the target's class is swapped for a
  subclass whose forward runs the inserted modules around the original forward:
  `features.4` (MaxPool2d) -> `features.4.cbam_after`. The subclass keeps the original's name,
  type checks (`isinstance`) and parameters; it survives deepcopy, pickling, torch.compile and
  torch.export.
"""

from __future__ import annotations

import importlib
import inspect as _inspect
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Mapping, NoReturn, Sequence

import torch
from torch import nn

from ..errors import describe_exception, did_you_mean, quote_value
from ..spec import InsertSpec, Spec
from .modes import evaluating
from .paths import nearest, select_modules


# --------------------------------------------------------------------------- the attention registry
def _candidate_names(module: Any) -> list[str]:
    # Asked of timm, never read from its source text: the string constants of `get_attn` (the
    # names it accepts) and the keys of any dict the module holds (a registry, should timm move to one).
    # Each candidate is then put to `get_attn` itself, which keeps only the names it accepts.
    names: list[str] = []
    codes = [module.get_attn.__code__]
    while codes:
        code = codes.pop(0)
        for const in code.co_consts:
            if isinstance(const, str):
                names.append(const)
            elif hasattr(const, "co_consts"):
                codes.append(const)
    for value in vars(module).values():
        if isinstance(value, dict):
            names.extend(k for k in value if isinstance(k, str))
    return [n for n in dict.fromkeys(names) if n.isidentifier() and n == n.lower()]


@lru_cache(maxsize=1)
def attention_names() -> tuple[str, ...]:
    """Names timm's `get_attn` accepts, asked of timm itself so new timm releases add theirs."""
    module = importlib.import_module("timm.layers.create_attn")
    accepted = []
    for name in _candidate_names(module):
        try:
            factory = module.get_attn(name)
        except Exception:  # noqa: BLE001 - timm rejects an unknown name with an assert
            continue
        if factory is not None and callable(factory):
            accepted.append(name)
    return tuple(accepted)


# Registry entries that timm cannot build as Module(channels) with its defaults (checked at 64
# channels on a 32 px map, timm 1.0.31), and the argument that makes them work. Quoted in the
# error when such an entry fails and its user has not set that argument.
_NEEDS: dict[str, tuple[str, str]] = {
    "bottleneck": ("feat_size", "BottleneckAttn needs feat_size, the [height, width] of the map it runs on{feat}"),
    "halo": (
        "block_size",
        "HaloAttn needs a map whose height and width are multiples of block_size "
        "(8 by default; halo_size, 3 by default, at most block_size){divisors}",
    ),
    "bat": (
        "block_size",
        "BatNonLocalAttn needs a map whose height and width are multiples of block_size (7 by default){divisors}",
    ),
    "ge": (
        "use_mlp",
        "timm's GatherExcite passes act_layer twice to ConvMlp when use_mlp is true, its "
        "default (a timm 1.0 bug): set use_mlp: false (gather-excite without its MLP)",
    ),
}


@lru_cache(maxsize=None)
def default_failure(name: str) -> str | None:
    """Why timm cannot build registry entry `name` with its defaults (64 channels, 32 px), or None."""
    from timm.layers import get_attn

    try:
        module = get_attn(name)(64).eval()
        with torch.no_grad():
            module(torch.zeros(1, 64, 32, 32))
    except Exception as exc:  # noqa: BLE001 - whatever timm raises is the reason
        return describe_exception(exc, 200)
    return None


def _needs_hint(item: InsertSpec, shape: Sequence[int] | None) -> str | None:
    name = item.insert.lower()
    if name not in _NEEDS or _NEEDS[name][0] in item.args:
        return None
    key, text = _NEEDS[name]
    feat = divisors = ""
    if shape is not None and len(shape) == 4:
        h, w = int(shape[2]), int(shape[3])
        feat = f": here args: {{feat_size: [{h}, {w}]}}"
        common = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        divisors = f"; this {h}x{w} map takes block_size " + " or ".join(str(d) for d in common[-3:])
    return f"set args.{key}: " + text.format(feat=feat, divisors=divisors)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _odd_kernel(value: Any) -> bool:
    sizes = value if isinstance(value, (list, tuple)) else [value]
    return bool(sizes) and all(_number(k) and int(k) == k and k >= 1 and k % 2 == 1 for k in sizes)


# Numeric arguments of timm's attention modules that timm takes without a check, though a value
# out of range builds a module that computes nothing meaningful (rd_ratio: -1 still trains).
_RANGES: dict[str, tuple[Any, str]] = {
    "rd_ratio": (lambda v: _number(v) and 0 < v <= 1, "a reduction ratio in (0, 1], e.g. 0.0625"),
    "rd_divisor": (lambda v: _number(v) and int(v) == v and v >= 1, "an integer >= 1"),
    "rd_channels": (lambda v: v is None or (_number(v) and int(v) == v and v >= 1), "an integer >= 1, or null"),
    "kernel_size": (lambda v: v is None or _odd_kernel(v), "an odd integer >= 1 (a list of them for sk)"),
    "spatial_kernel_size": (_odd_kernel, "an odd integer >= 1"),
    "num_heads": (lambda v: _number(v) and int(v) == v and v >= 1, "an integer >= 1"),
    "block_size": (lambda v: _number(v) and int(v) == v and v >= 1, "an integer >= 1"),
    "halo_size": (lambda v: _number(v) and int(v) == v and v >= 0, "an integer >= 0"),
    "groups": (lambda v: _number(v) and int(v) == v and v >= 1, "an integer >= 1"),
    "drop_rate": (lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    "gamma": (lambda v: _number(v) and v > 0, "a number > 0"),
}


def _out_of_range(item: InsertSpec) -> list[tuple[str, str]]:
    """(key, expected) for each registry-module argument whose value is outside its range."""
    if ":" in item.insert:  # a user class defines its own arguments
        return []
    return [(k, _RANGES[k][1]) for k, v in item.args.items() if k in _RANGES and not _RANGES[k][0](v)]


def _user_class(spec: Spec, item: InsertSpec) -> type:
    where = ("surgery", item.index, "insert")
    module_name, _, class_name = item.insert.partition(":")
    from .user_code import import_user_module

    module = import_user_module(
        spec, where, module_name, found=item.insert, expected="an importable 'package.module:Class'"
    )
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        names = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)]
        raise spec.error(
            where,
            f"{module_name} has no nn.Module class {class_name!r}",
            found=item.insert,
            expected="an nn.Module subclass constructed as Class(channels, **args)",
            hint=did_you_mean(class_name, names),
        )
    return cls


def module_factory(spec: Spec, item: InsertSpec):
    """A callable channels -> nn.Module for one surgery entry (timm registry name or user class)."""
    if ":" in item.insert:
        return _user_class(spec, item)
    name = item.insert.lower()
    if name not in attention_names():
        raise spec.error(
            ("surgery", item.index, "insert"),
            f"timm's attention registry has no {item.insert!r}",
            found=item.insert,
            expected="one of " + ", ".join(attention_names()) + ", or 'package.module:Class'",
            hint=did_you_mean(name, attention_names()),
        )
    from timm.layers import get_attn

    return get_attn(name)


# --------------------------------------------------------------------------- inserted modules
class Inserted(nn.Module):
    """An inserted module; with `init: identity`, a zero-initialised gate on a residual around it.

    identity: out = x + gate * (attn(x) - x), gate = 0 at first, so the model computes exactly
    what the backbone computed until training moves the gate.
    default: out = attn(x), the module as published.
    """

    def __init__(self, attn: nn.Module, *, identity: bool, kind: str, target: str, position: str) -> None:
        super().__init__()
        self.attn = attn
        self.gate = nn.Parameter(torch.zeros(1)) if identity else None
        self.kind, self.target, self.position = kind, target, position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(x)
        if self.gate is None:
            return y
        # x + gate * (y - x) as one fused operator (one pass over the map instead of three, no
        # temporary): exactly x at gate 0, within rounding of the three-operator form otherwise
        # (tests/test_inserted_gate.py); dtypes as that form would promote them (autocast)
        dtype = torch.promote_types(x.dtype, y.dtype)
        return torch.lerp(x.to(dtype), y.to(dtype), self.gate.to(dtype))

    def extra_repr(self) -> str:
        return f"{self.kind} {self.position} {self.target}" + (", identity gate" if self.gate is not None else "")


class _WithInserts:
    """Mixin placed in front of a module's own class: runs inserted children around its forward."""

    # names of the inserted children run before / after the original forward; not annotated, so
    # that TorchScript, which reads class annotations, never meets a type it cannot compile
    _surgery_before = ()
    _surgery_after = ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._surgery_before:
            x = args[0]
            for name in self._surgery_before:
                x = self._modules[name](x)
            args = (x, *args[1:])
        out = super().forward(*args, **kwargs)
        for name in self._surgery_after:
            out = self._modules[name](out)
        return out

    def _get_name(self) -> str:
        return self._surgery_original.__name__

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script compiles neither *args nor super(): it scripts the same computation,
        # the modules before -> the original module -> the modules after, on the same tensors
        names = (*self._surgery_before, *self._surgery_after)
        inner = self._surgery_original.__new__(self._surgery_original)
        inner.__dict__ = {k: v for k, v in self.__dict__.items() if k not in ("_surgery_before", "_surgery_after")}
        inner._modules = {k: v for k, v in self._modules.items() if k not in names}
        return _ScriptedInserts(
            [self._modules[n] for n in self._surgery_before], inner, [self._modules[n] for n in self._surgery_after]
        )


class _ScriptedInserts(nn.Module):
    """What TorchScript compiles in place of a module with inserts (see `__prepare_scriptable__`)."""

    def __init__(self, before: Sequence[nn.Module], inner: nn.Module, after: Sequence[nn.Module]) -> None:
        super().__init__()
        self.before, self.inner, self.after = nn.ModuleList(before), inner, nn.ModuleList(after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.before:
            x = m(x)
        x = self.inner(x)
        for m in self.after:
            x = m(x)
        return x


_ESCAPES = {"_": "_u", ".": "_d"}
_SEP = "_s"  # between module and qualname; "_" is always escaped, so the encoding is unambiguous


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def _class_key(cls: type) -> str:
    # torchvision.models.densenet._DenseLayer and friends: names with "_" and "__" must round-trip
    return "WithInserts__" + _escape(cls.__module__) + _SEP + _escape(cls.__qualname__)


def _parse_class_key(name: str) -> tuple[str, str]:
    parts, out, chars = [], [], iter(name[len("WithInserts__") :])
    for c in chars:
        if c != "_":
            out.append(c)
            continue
        code = next(chars, "")
        if code == "s":
            parts.append("".join(out))
            out = []
        else:
            out.append({"u": "_", "d": "."}.get(code, "?"))
    parts.append("".join(out))
    if len(parts) != 2:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return parts[0], parts[1]


_SWAPPED: dict[type, type] = {}


def with_inserts(cls: type) -> type:
    """The cached subclass of `cls` that runs inserted modules; importable by name for pickling."""
    if cls not in _SWAPPED:
        key = _class_key(cls)
        new = type(key, (_WithInserts, cls), {"_surgery_original": cls, "__module__": __name__, "__qualname__": key})
        _SWAPPED[cls] = new
    return _SWAPPED[cls]


def __getattr__(name: str) -> type:  # lets pickle find a swapped class in a fresh process
    if name.startswith("WithInserts__"):
        module, qualname = _parse_class_key(name)
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            raise AttributeError(
                f"module {__name__!r} has no attribute {name!r} ({module}.{qualname} not found)"
            ) from None
        return with_inserts(obj)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


# --------------------------------------------------------------------------- shape probe
@dataclass(frozen=True)
class Shapes:
    inputs: tuple[int, ...] | None
    output: tuple[int, ...] | None
    calls: int
    start: int = -1  # when its first call began and ended, in the pass's order of calls and returns:
    end: int = -1  # what ran after a module, and so what its output feeds, is read off these


# torch logs every op that fails on fake tensors, traceback and all, at ERROR; our callers catch
# the failure and either run for real or name it in a located error, so that log is noise
_FAKE_TENSOR_LOGGERS = ("torch._subclasses.fake_tensor",)


@contextmanager
def fake_tensors() -> Iterator[None]:
    """A shape-only pass (torch's FakeTensorMode; tensors made inside are fake too), with torch's
    own logging of a failed op kept off the user's terminal for its duration."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    loggers = [logging.getLogger(name) for name in _FAKE_TENSOR_LOGGERS]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def probe(model: nn.Module, input_size: Sequence[int]) -> dict[str, Shapes]:
    """Run one dry forward pass (eval mode, no grad: running statistics stay untouched) and
    record every module's input and output shape. Modules not called are absent.

    The pass runs on fake tensors (shapes only, no arithmetic: a 224 px ResNet50 probe costs
    a tenth of a real forward pass); a model that fake tensors cannot run is probed for real,
    which also surfaces the model's own error message when the input does not fit it.
    """
    try:
        with fake_tensors():
            return _probe(model, input_size)
    except Exception:  # noqa: BLE001 - any failure: the real pass below decides
        return _probe(model, input_size)


def _probe(model: nn.Module, input_size: Sequence[int]) -> dict[str, Shapes]:
    seen: dict[str, list] = {}
    clock: dict[str, int] = {}
    ticks = [0]

    def started(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            clock.setdefault(name + ":start", ticks[0])
            ticks[0] += 1

        return record

    def shape_of(value: Any) -> tuple[int, ...] | None:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            entry = seen.setdefault(name, [None, None, 0, set()])
            entry[0] = shape_of(args[0]) if args else None
            entry[1] = shape_of(output)
            entry[2] += 1
            entry[3].add((entry[0], entry[1]))
            clock.setdefault(name + ":end", ticks[0])
            ticks[0] += 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    handles += [m.register_forward_pre_hook(started(n)) for n, m in model.named_modules()]
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, dtype=param.dtype if param is not None else torch.float32)
        with evaluating(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {
        n: Shapes(e[0], e[1], e[2] if len(e[3]) == 1 else -e[2], clock.get(n + ":start", -1), clock.get(n + ":end", -1))
        for n, e in seen.items()
    }


def channels_last(module: nn.Module, shape: Sequence[int] | None) -> bool:
    """True when a 4-D map is laid out (N, H, W, C), as inside ConvNeXt blocks and Swin stages.

    The probe input is square, so a map's height and width are equal: (N, C, H, H) is
    channels-first, (N, H, H, C) channels-last. Only a map as wide as it has channels is
    ambiguous; then the module that made it decides (a Linear or a plain LayerNorm works on the
    last dim).
    """
    if shape is None or len(shape) != 4:
        return False
    _, a, b, c = shape
    if a == b != c:
        return True
    if a == b == c:
        return isinstance(module, nn.Linear) or (
            isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
        )
    return False


# --------------------------------------------------------------------------- plan and apply
@dataclass
class Insertion:
    """One module to insert: where, what, and the module itself (built, not yet attached)."""

    target: str
    name: str
    kind: str
    position: str
    init: str
    channels: int
    index: int
    module: Inserted
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.target}.{self.name}"

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "target": self.target,
            "type": self.kind,
            "position": self.position,
            "init": self.init,
            "channels": self.channels,
            "args": dict(self.args),
            "params": sum(p.numel() for p in self.module.parameters()),
        }


def _slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", kind.split(":")[-1].lower())


def plan_surgery(
    spec: Spec, model: nn.Module, shapes: Mapping[str, Shapes], head: Sequence[str] = ()
) -> list[Insertion]:
    """Resolve every insert entry to concrete targets and build its modules; raise before any change."""
    modules = dict(model.named_modules())
    plan: list[Insertion] = []
    taken: dict[str, set[str]] = {}
    for item in spec.surgery:
        if isinstance(item, InsertSpec):
            plan.extend(plan_insert(spec, item, modules, shapes, head, taken))
    return plan


def insert_targets(
    spec: Spec, item: InsertSpec, modules: Mapping[str, nn.Module], head: Sequence[str] = ()
) -> list[str]:
    """The module paths one insert entry's `at` selects, in order, each once."""
    targets: list[str] = []
    for sel in item.at:
        if sel.pattern in ("@inserted",):
            raise spec.error(
                sel.where,
                "surgery targets are modules of the backbone",
                found=sel.pattern,
                expected="a module path, a glob or {type: ClassName}",
            )
        if sel.pattern == "@head":
            found = list(head)
        else:
            found = select_modules(modules, sel.pattern, sel.type)
        if not found:
            raise _matched_nothing(spec, sel, modules)
        targets.extend(t for t in found if t not in targets)
    return targets


def plan_insert(
    spec: Spec,
    item: InsertSpec,
    modules: Mapping[str, nn.Module],
    shapes: Mapping[str, Shapes],
    head: Sequence[str],
    taken: dict[str, set[str]],
    targets: Sequence[str] | None = None,
) -> list[Insertion]:
    """Build the modules of one insert entry at its targets (resolved here unless given)."""
    factory = module_factory(spec, item)
    kind = item.insert if ":" in item.insert else item.insert.lower()
    plan: list[Insertion] = []
    for target in insert_targets(spec, item, modules, head) if targets is None else targets:
        channels = _channels(spec, item, target, modules, shapes)
        base = f"{_slug(kind)}_{item.position}"
        used = taken.setdefault(target, set(modules[target]._modules))
        name, n = base, 2
        while name in used or hasattr(modules[target], name):
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        side_shape = shapes[target].inputs if item.position == "before" else shapes[target].output
        attn = _construct(spec, item, factory, channels, target, side_shape)
        _check_ranges(spec, item)
        _dry_run(spec, item, attn, shapes[target], target)
        module = Inserted(attn, identity=item.init == "identity", kind=kind, target=target, position=item.position)
        plan.append(Insertion(target, name, kind, item.position, item.init, channels, item.index, module, item.args))
    return plan


def _matched_nothing(spec: Spec, sel, modules: Mapping[str, nn.Module]) -> Exception:
    if sel.type is not None:
        from .paths import type_names

        types = sorted({type_names(m)[0] for m in modules.values()})
        return spec.error(
            sel.where,
            f"the backbone has no module of type {sel.type!r}",
            found=sel.type,
            expected="a class name of the backbone's modules (see `surgery inspect`)",
            hint=did_you_mean(sel.type, types) or "types here: " + ", ".join(types[:12]),
        )
    close = nearest(sel.pattern, [p for p in modules if p])
    return spec.error(
        sel.where,
        f"no module of {spec.model.backbone} matches {sel.pattern!r}",
        found=sel.pattern,
        expected="a module path or glob of the backbone (`surgery inspect " + spec.model.backbone + "` lists them)",
        hint=("did you mean " + " or ".join(repr(c) for c in close) + "?") if close else None,
    )


def _side(shapes: Shapes | None, position: str) -> tuple[int, ...] | None:
    if shapes is None:
        return None
    return shapes.inputs if position == "before" else shapes.output


def _insertable(module: nn.Module, shapes: Shapes | None, position: str) -> bool:
    # what _channels accepts, for positions named in hints: a hint must lead somewhere that works
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or (
        isinstance(module, nn.Sequential) and not _plain_sequential(module)
    ):
        return False
    shape = _side(shapes, position)
    return (
        shapes is not None
        and shapes.calls == 1
        and shape is not None
        and len(shape) == 4
        and not channels_last(module, shape)
    )


def _image_map(shape: Sequence[int] | None, shapes: Mapping[str, Shapes], modules: Mapping[str, nn.Module]) -> bool:
    """Is a 4-D map one image's (channels, height, width), not attention weights laid out alike?
    Window attention's (windows, heads, tokens, tokens) has more than the probe's one image in its
    batch; its weights (a softmax's output, and the dropout on them) are never a feature map."""
    root = shapes.get("")
    batch = root.inputs[0] if root is not None and root.inputs else 1
    weights = {shapes[p].output for p, m in modules.items() if isinstance(m, nn.Softmax) and p in shapes}
    return shape is not None and shape[0] == batch and tuple(shape) not in weights


def _channels_first_near(
    target: str, position: str, modules: Mapping[str, nn.Module], shapes: Mapping[str, Shapes], n: int = 3
) -> list[str]:
    """Positions near `target` whose map is channels-first: its ancestors (deepest first), then
    the closest ones run before and after it."""
    fits = [
        p
        for p, m in modules.items()
        if p
        and p != target
        and _insertable(m, shapes.get(p), position)
        and _image_map(_side(shapes[p], position), shapes, modules)
    ]
    ancestors = [p for p in fits if target.startswith(p + ".")]
    ancestors.sort(key=len, reverse=True)
    here = shapes[target]
    rest = [p for p in fits if p not in ancestors and not p.startswith(target + ".")]
    before = [p for p in rest if shapes[p].end <= here.start]
    after = [p for p in rest if shapes[p].start >= here.end]
    near = ancestors[:2]
    if before:
        near.append(max(before, key=lambda p: (shapes[p].end, -shapes[p].start)))
    if after:
        near.append(min(after, key=lambda p: (shapes[p].start, -shapes[p].end)))
    return list(dict.fromkeys(near))[:n]


def _same_map_elsewhere(
    target: str, position: str, modules: Mapping[str, nn.Module], shapes: Mapping[str, Shapes]
) -> tuple[str, str] | None:
    """An insertable position that sees exactly the map at `target`'s output (or input): the
    module run right after it, taking that map as input (or the one run right before it,
    whose output it is). (path, position) or None."""
    here = shapes[target]
    outside = {
        p: sh
        for p, sh in shapes.items()
        if p and p != target and not p.startswith(target + ".") and not target.startswith(p + ".")
    }
    if position == "after":
        later = sorted((sh.start, p) for p, sh in outside.items() if sh.start >= here.end)
        for _, p in later:
            if shapes[p].inputs == here.output and _insertable(modules[p], shapes[p], "before"):
                return p, "before"
            if shapes[p].inputs != here.output:
                break  # the next module takes another map: the output went somewhere else first
    else:
        earlier = sorted(((sh.end, p) for p, sh in outside.items() if 0 <= sh.end <= here.start), reverse=True)
        for _, p in earlier:
            if shapes[p].output == here.inputs and _insertable(modules[p], shapes[p], "after"):
                return p, "after"
            if shapes[p].output != here.inputs:
                break
    return None


def _refuse_container(
    spec: Spec, item: InsertSpec, target: str, modules: Mapping[str, nn.Module], all_shapes: Mapping[str, Shapes]
) -> NoReturn:
    """A container whose own forward walks its children: nothing can be inserted at it."""
    where = ("surgery", item.index, "at")
    module, shapes = modules[target], all_shapes.get(target)
    if shapes is None:
        raise spec.error(
            where,
            f"{target} is a {type(module).__name__}, which has no output of its own",
            found=target,
            expected="a module that is called in the forward pass",
            hint=f"insert at its elements instead, e.g. '{target}.*'",
        )
    # its own forward walks its children (densenet's blocks, timm's SequentialList): a module
    # added as a child would run inside that walk, not before or after it. Its last child's
    # output is not the container's (a dense block concatenates), so the hint names the
    # position the probe saw take the container's own output.
    same = _same_map_elsewhere(target, item.position, modules, all_shapes)
    shape = _side(shapes, item.position)
    hint = (
        f"use at: '{same[0]}' with position: {same[1]} instead: it sees this very {list(shape)} map "
        f"(the last element of {target} sees only part of it)"
        if same
        else f"insert before the module that takes its output (its {list(shape) if shape else 'output'}), "
        "not at its last element, whose output is only part of it"
    )
    raise spec.error(
        where,
        f"{target} is a {type(module).__name__} whose forward runs its children itself, "
        "so a module added to it would run inside that loop",
        found=target,
        expected="a plain module or a plain nn.Sequential",
        hint=hint,
    )


def _channels(
    spec: Spec, item: InsertSpec, target: str, modules: Mapping[str, nn.Module], all_shapes: Mapping[str, Shapes]
) -> int:
    where = ("surgery", item.index, "at")
    module, shapes = modules[target], all_shapes.get(target)
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or (
        isinstance(module, nn.Sequential) and not _plain_sequential(module)
    ):
        _refuse_container(spec, item, target, modules, all_shapes)
    if shapes is None:
        raise spec.error(
            where,
            f"{target} is never called in the forward pass, so nothing inserted there would run",
            found=target,
            expected="a module on the forward path (`surgery inspect` shows output shapes)",
        )
    if shapes.calls != 1:
        # torchvision's BasicBlock calls one ReLU twice: a module inserted there would run twice, sharing weights
        differ = " with different shapes" if shapes.calls < 0 else ""
        raise spec.error(
            where,
            f"{target} is called {abs(shapes.calls)} times per forward pass{differ}; "
            "one inserted module would run at every call",
            found=target,
            expected="a module called once per forward pass",
            hint="shared modules such as torchvision's reused ReLU are poor targets; pick the layer before",
        )
    shape = _side(shapes, item.position)
    side = "input" if item.position == "before" else "output"
    if shape is None or len(shape) != 4:
        raise spec.error(
            where,
            f"the {side} of {target} is not a 4-D feature map, so attention cannot go {item.position} it",
            found=f"{target} {side} shape {list(shape) if shape else 'not a tensor'}",
            expected="a module whose " + side + " is (batch, channels, height, width)",
        )
    if channels_last(module, shape):
        # attention modules take (N, C, H, W): on (N, H, W, C) they would pool over the wrong axes
        # and still run, so the mistake would only show as a model that learns less
        near = _channels_first_near(target, item.position, modules, all_shapes)
        raise spec.error(
            where,
            f"the {side} of {target} is channels-last, {list(shape)} = (batch, height, width, "
            f"{shape[3]} channels): {item.insert} expects (batch, channels, height, width) and would "
            "pool over the wrong axes",
            found=f"{target} {side} shape {list(shape)}",
            expected="a module whose " + side + " is (batch, channels, height, width)",
            hint=("channels-first positions nearby: " + ", ".join(repr(p) for p in near))
            if near
            else "this backbone keeps its maps channels-last; insert where they are channels-first",
        )
    return int(shape[1])


def _signature(factory) -> _inspect.Signature | None:
    try:
        return _inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def _args_hint(item: InsertSpec, shape: Sequence[int] | None) -> str | None:
    # What to change when a registry module fails: an argument out of range, the argument timm
    # needs for this entry, or that timm cannot build the entry with its defaults at all.
    bad = _out_of_range(item)
    if bad:
        return "; ".join(f"args.{k} must be {expected}" for k, expected in bad)
    needs = _needs_hint(item, shape)
    if needs or ":" in item.insert:
        return needs
    reason = default_failure(item.insert.lower())
    if reason:
        return (
            f"timm cannot build {item.insert!r} with its own defaults either ({reason}); "
            "this registry entry is unsupported as Module(channels) in this timm release"
        )
    return None


def _construct(
    spec: Spec, item: InsertSpec, factory, channels: int, target: str, shape: Sequence[int] | None = None
) -> nn.Module:
    signature = _signature(factory)
    try:
        module = factory(channels, **dict(item.args))
    except TypeError as exc:
        try:
            fits = signature is not None and bool(signature.bind(channels, **dict(item.args)))
        except TypeError:
            fits = False
        if not fits:  # else the TypeError comes from inside the module: handled below
            params = list(signature.parameters) if signature is not None else []
            unknown = [k for k in item.args if k not in params]
            raise spec.error(
                ("surgery", item.index, "args"),
                f"{item.insert} rejects these arguments: {exc}",
                found=repr(dict(item.args)),
                expected=f"arguments of {item.insert}{signature or '(channels, ...)'}",
                hint=did_you_mean(unknown[0], params[1:]) if unknown else None,
            ) from None
        raise spec.error(
            ("surgery", item.index, "args"),
            f"{item.insert} cannot be built for {channels} channels at {target}: " + describe_exception(exc, 400),
            found=repr(dict(item.args)),
            expected=f"arguments of {item.insert}{signature} that fit this width",
            hint=_args_hint(item, shape),
        ) from None
    except Exception as exc:  # noqa: BLE001 - library asserts included: a module that cannot be built is a spec problem
        raise spec.error(
            ("surgery", item.index, "args"),
            f"{item.insert} cannot be built for {channels} channels at {target}: " + describe_exception(exc, 400),
            found=repr(dict(item.args)),
            expected="arguments that fit this width",
            hint=_args_hint(item, shape),
        ) from None
    if not isinstance(module, nn.Module):
        raise spec.error(
            ("surgery", item.index, "insert"),
            f"{item.insert} did not build an nn.Module",
            found=type(module).__name__,
            expected="an nn.Module",
        )
    return module


def _check_ranges(spec: Spec, item: InsertSpec) -> None:
    # after construction, so that timm's own checks (and their messages) come first
    for key, expected in _out_of_range(item):
        raise spec.error(
            ("surgery", item.index, "args", key),
            f"{item.insert}'s {key} is out of range: timm builds the module, but it would not compute what {key} means",
            found=quote_value(item.args[key]),
            expected=expected,
        )


_REAL_DRY_RUN_LIMIT = 1 << 24  # elements: a bigger map is only checked on fake tensors


def _memory_error(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, (MemoryError, torch.OutOfMemoryError))
        or "can't allocate memory" in text
        or "out of memory" in text
    )


def _run_on(attn: nn.Module, shape: Sequence[int]) -> Any:
    # Shapes only, first: a huge image_size costs nothing here. Some modules cannot run on fake
    # tensors (data-dependent shapes); a real pass decides for them, at sizes that fit in memory.
    try:
        with fake_tensors():
            out = attn(torch.zeros(shape))
            return tuple(out.shape) if isinstance(out, torch.Tensor) else out
    except Exception:  # noqa: BLE001 - the real pass below is the authority
        if math.prod(shape) > _REAL_DRY_RUN_LIMIT:
            raise
    out = attn(torch.zeros(shape))
    return tuple(out.shape) if isinstance(out, torch.Tensor) else out


def _dry_run(spec: Spec, item: InsertSpec, attn: nn.Module, shapes: Shapes, target: str) -> None:
    # A module that fails on this feature map, or reshapes it, is a spec problem: say so now,
    # at its own surgery entry, before the model is changed.
    shape = shapes.inputs if item.position == "before" else shapes.output
    side = "input" if item.position == "before" else "output"
    try:
        with evaluating(attn), torch.no_grad():
            out = _run_on(attn, shape)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, the spec entry is the cause
        if _memory_error(exc):  # the size of the map is at fault, not the module's arguments
            raise spec.error(
                ("data", "image_size"),
                f"a {list(shape)} feature map at {target} does not fit in memory "
                f"for {item.insert}: {describe_exception(exc, 120)}",
                found=str(spec.data.image_size),
                expected="an image size whose feature maps fit in memory",
            ) from None
        signature = _signature(module_factory(spec, item))
        raise spec.error(
            ("surgery", item.index, "args"),
            f"{item.insert} fails on the {side} of {target}, a {list(shape)} feature map: "
            + describe_exception(exc, 400),
            found=repr(dict(item.args)),
            expected=f"arguments of {item.insert}{signature or ''} that fit this feature map",
            hint=_args_hint(item, shape)
            or "self-attention modules (halo, bottleneck, bat) constrain the feature size; "
            "pick a target with a size they accept, or a channel attention (se, eca, cbam)",
        ) from None
    if not isinstance(out, tuple) or out != tuple(shape):
        got = list(out) if isinstance(out, tuple) else type(out).__name__
        raise spec.error(
            ("surgery", item.index, "args" if item.args else "insert"),
            f"{item.insert} turns the {side} of {target}, {list(shape)}, into {got}",
            found=item.insert,
            expected="a module that keeps the feature map's shape",
            hint="modules with a stride or other output channels cannot be inserted; check surgery args",
        )


def apply_surgery(model: nn.Module, plan: Sequence[Insertion]) -> None:
    """Attach the planned modules. Adds keys, renames none (checked by the caller)."""
    for ins in plan:
        target = model.get_submodule(ins.target)
        if _plain_sequential(target):
            items = list(target._modules.items())
            items = [(ins.name, ins.module)] + items if ins.position == "before" else items + [(ins.name, ins.module)]
            target._modules.clear()
            target._modules.update(items)
            continue
        if not isinstance(target, _WithInserts):
            target.__class__ = with_inserts(type(target))
        target.add_module(ins.name, ins.module)
        if ins.position == "before":
            target._surgery_before = (*target._surgery_before, ins.name)
        else:
            target._surgery_after = (*target._surgery_after, ins.name)


def inserted_paths(model: nn.Module) -> list[str]:
    """Paths of every inserted module in a surgered model, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, Inserted)]
