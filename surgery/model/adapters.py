"""LoRA adapters at module paths: planned and checked first, attached without renaming a key, merged on export.

A `lora:` entry gives each matched Linear or Conv2d a low-rank update of its weight,

    W' = W + (alpha / rank) * B @ A        A: (rank, fan_in), B: (out, rank), fan_in = in / groups * kernel area

B starts at zero (peft's init; A is Kaiming-uniform as peft's), so at step 0 W' is W bit for bit
and the model computes exactly what the backbone computes. The module stays where it was, of
its own class (a cached subclass adds the adapter, as inserts do), with its own `weight` and
`bias` keys: only `<path>.lora_A` and `<path>.lora_B` are added. Its class's own forward runs on
W' (a `weight` property), so any Linear or Conv2d subclass (timm's Conv2dSame, a grouped or
depthwise convolution) is adapted the same way, and `merge_adapters` writes W' into `weight`
and gives back the plain module: the backbone's architecture and keys, the same outputs.

Why not peft's layers: `peft.tuners.lora` wraps a layer as `<path>.base_layer`, renaming every
pretrained key (`x.weight` -> `x.base_layer.weight`), which this project's rule that surgery
only adds keys forbids (`builder._check_no_key_lost`, the load report, `key_map: order`, the run
reader's strict load and the merged export all rely on it); it does not split a fused qkv
Linear either. The computation is the same as peft's (tests/test_adapters.py checks the outputs
against `peft.tuners.lora.layer.Linear` / `Conv2d` given the same A and B, where peft is installed).

`targets: [q, v]` on a fused qkv Linear (out = 3 x width): one independent rank-r pair per
target, each updating its third of the output rows, as LoRA on separate Wq and Wv would;
the other rows of W' are W's.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import LoraSpec, Spec
from .paths import select_modules, type_names

QKV = ("q", "k", "v")


@dataclass
class Adapter:
    """One planned LoRA: the module at `path`, its rank, scaling, dropout and targeted thirds
    (() for the whole layer), the A and B built for it, and the entry's index in `surgery`."""

    path: str
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    index: int
    layer: str  # the layer's type name, for the load report

    @property
    def params(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.layer,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets) or None,
            "params": self.params,
            "entry": self.index,
        }


class _Lora:
    """Mixed into the adapted module's class: its `weight` reads W + scale * B @ A."""

    _surgery_lora = True

    @property
    def weight(self) -> torch.Tensor:
        w = self._parameters["weight"]
        if self._lora_mode == "delta":
            return lora_delta(self).to(w.dtype)
        if self._lora_mode == "base":
            return w
        return w + lora_delta(self).to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self._lora_mode == "delta" else self._parameters.get("bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self._lora_dropout > 0):
            return super().forward(x)
        # dropout on the adapter's input only (peft's lora_dropout): base(x) + delta(dropout(x))
        try:
            self._lora_mode = "base"
            out = super().forward(x)
            self._lora_mode = "delta"
            return out + super().forward(F.dropout(x, self._lora_dropout, training=True))
        finally:
            self._lora_mode = None


def lora_delta(module: nn.Module) -> torch.Tensor:
    """scale * B @ A shaped as the module's weight, zero rows for the thirds not targeted."""
    w = module._parameters["weight"]
    a, b, rank = module.lora_A, module.lora_B, module._lora_rank
    slots = module._lora_slots  # for each third of a qkv Linear, the target's index, or None
    if not slots:
        return ((b @ a) * module._lora_scale).view(w.shape)
    width = w.shape[0] // 3
    blocks = torch.bmm(b.view(-1, width, rank), a.view(-1, rank, a.shape[1])) * module._lora_scale
    rows = [blocks[i] if i is not None else w.new_zeros(width, a.shape[1]) for i in slots]
    return torch.cat(rows).view(w.shape)


_SWAPPED: dict[type, type] = {}


def _class_key(cls: type) -> str:
    return "WithLora__" + f"{cls.__module__}.{cls.__qualname__}".replace("_", "_0").replace(".", "_1")


def with_lora(cls: type) -> type:
    """The cached subclass of `cls` whose weight carries the adapter; importable by name for pickling."""
    if cls not in _SWAPPED:
        key = _class_key(cls)
        _SWAPPED[cls] = type(key, (_Lora, cls), {"_surgery_original": cls, "__module__": __name__, "__qualname__": key})
    return _SWAPPED[cls]


def __getattr__(name: str) -> type:  # lets pickle find a swapped class in a fresh process
    if name.startswith("WithLora__"):
        dotted = name[len("WithLora__") :].replace("_1", ".").replace("_0", "_")
        for cut in range(dotted.count("."), 0, -1):
            module, qualname = dotted.rsplit(".", cut)[0], ".".join(dotted.rsplit(".", cut)[1:])
            try:
                obj: Any = importlib.import_module(module)
                for part in qualname.split("."):
                    obj = getattr(obj, part)
                return with_lora(obj)
            except (ImportError, AttributeError):
                continue
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_adapted(module: nn.Module) -> bool:
    return getattr(type(module), "_surgery_lora", False)


# --------------------------------------------------------------------------- plan
def _fan_in(module: nn.Module) -> int:
    w = module.weight
    return int(math.prod(w.shape[1:]))


def _refusal(spec: Spec, item: LoraSpec, path: str, module: nn.Module) -> Exception | None:
    """Why `module` cannot take this entry's adapter, as a located error; None when it can."""
    where = ("surgery", item.index)
    kind = type_names(module)[0]
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or not isinstance(module._parameters.get("weight"), nn.Parameter):
        return spec.error(
            where + ("lora",),
            f"{path} is a {kind}: LoRA adapts the weight of a Linear or a Conv2d",
            found=f"{path} ({kind})",
            expected="Linear or Conv2d modules",
            hint=f"target the layers inside it, e.g. '{path}.*' or '{path}.**.conv*'"
            if any(module.children())
            else "target the Linear or Conv2d before or after it",
        )
    out = module.weight.shape[0]
    if item.targets:
        if not isinstance(module, nn.Linear) or out % 3:
            return spec.error(
                where + ("targets",),
                f"targets picks q, k, v of a fused qkv Linear, but {path} is a {kind} with "
                f"{out} outputs" + (", not three equal parts" if out % 3 else ""),
                found=f"{path} ({kind})",
                expected="a Linear whose output is q, k and v side by side (timm's attn.qkv)",
                hint="leave targets out to adapt the whole layer",
            )
        out //= 3
    side = min(out, _fan_in(module))
    if item.rank > side:
        groups = getattr(module, "groups", 1)
        return spec.error(
            where + ("rank",),
            f"rank {item.rank} is larger than {path} allows: its update is a {out} x {_fan_in(module)} matrix"
            + (f" (in_channels / groups {groups} x kernel area)" if groups > 1 else ""),
            found=str(item.rank),
            expected=f"a rank of at most {side}",
            hint="a full-rank update is full fine-tuning: train the layer in a group instead",
        )
    return None


def _build(item: LoraSpec, path: str, module: nn.Module) -> Adapter:
    w = module.weight
    parts = max(len(item.targets), 1)
    out = w.shape[0] // 3 if item.targets else w.shape[0]
    a = torch.empty(parts * item.rank, _fan_in(module), dtype=w.dtype)
    for i in range(parts):  # peft's init: A Kaiming-uniform (a=sqrt(5)), B zero
        nn.init.kaiming_uniform_(a[i * item.rank : (i + 1) * item.rank], a=math.sqrt(5))
    b = torch.zeros(parts * out, item.rank, dtype=w.dtype)
    return Adapter(path, item.rank, item.alpha, item.dropout, item.targets, a, b, item.index, type_names(module)[0])


def plan_lora(
    spec: Spec,
    item: LoraSpec,
    modules: Mapping[str, nn.Module],
    taken: Mapping[str, tuple],
    earlier: Sequence[Adapter] = (),
) -> list[Adapter]:
    """The adapters of one `lora:` entry, every target checked before anything is built.

    `modules`: the model's own modules (inserted ones excluded); `taken`: paths an insert or a
    key-changing entry holds, to their spec key path (a LoRA there collides with it); `earlier`:
    the adapters of the entries before this one.

    Raises:
        SpecError: at the entry, for a pattern that matches nothing, a module that is not a
            Linear or Conv2d, a rank larger than the layer, targets on a layer that is no fused
            qkv, or a module an insert or an earlier entry already holds.
    """
    from .insert import _matched_nothing
    from .replace import entry_label

    paths: list[str] = []
    for sel in item.lora:
        found = [p for p in select_modules(modules, sel.pattern, sel.type) if p] if sel.pattern != "@head" else []
        if sel.pattern == "@head":
            raise spec.error(
                sel.where,
                "@head cannot take a LoRA adapter: a new head trains in full",
                found="@head",
                expected="a module path, a glob or {type: ClassName}",
            )
        if not found:
            raise _matched_nothing(spec, sel, modules)
        paths.extend(p for p in found if p not in paths)
    for path in paths:
        other = next((t for t in taken if t == path or t.startswith(path + ".")), None)
        if other is not None:
            raise spec.error(
                ("surgery", item.index, "lora"),
                f"{path} already carries {entry_label(spec, taken[other])}'s module at {other}: "
                "a LoRA adapter and an insert (or a replacement) on one module",
                found=path,
                expected="a module no other entry inserts at or changes",
                hint="adapt the layer inside it, or move the insert to another module",
            )
        twice = next((a for a in earlier if a.path == path), None)
        if twice is not None:
            raise spec.error(
                ("surgery", item.index, "lora"),
                f"{path} already has a LoRA adapter from {entry_label(spec, ('surgery', twice.index))}",
                found=path,
                expected="each module adapted by one entry",
                hint="merge the two entries, or narrow one of the patterns",
            )
        problem = _refusal(spec, item, path, modules[path])
        if problem is not None:
            raise problem
    return [_build(item, path, modules[path]) for path in paths]


def apply_adapters(model: nn.Module, adapters: Sequence[Adapter]) -> None:
    """Attach planned adapters: the module keeps its keys and gains `lora_A` and `lora_B`."""
    for ad in adapters:
        module = model.get_submodule(ad.path)
        module.__class__ = with_lora(type(module))
        module.register_parameter("lora_A", nn.Parameter(ad.lora_A.clone()))
        module.register_parameter("lora_B", nn.Parameter(ad.lora_B.clone()))
        module._lora_rank, module._lora_scale, module._lora_dropout = ad.rank, ad.alpha / ad.rank, ad.dropout
        module._lora_slots = tuple(ad.targets.index(t) if t in ad.targets else None for t in QKV) if ad.targets else ()
        module._lora_mode = None


def adapter_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every adapter tensor in the model, in model order."""
    return [f"{p}.{n}" for p, m in model.named_modules() if is_adapted(m) for n in ("lora_A", "lora_B")]


@torch.no_grad()
def merge_adapters(model: nn.Module) -> list[str]:
    """Write each adapter's update into its module's weight and give the module back its own
    class: the model then has exactly the backbone's architecture and keys. Returns the paths merged.

    Outputs equal the adapted model's up to float rounding of W + scale * B @ A (tests: 1e-5 in fp32)."""
    merged = []
    for path, module in model.named_modules():
        if not is_adapted(module):
            continue
        w = module._parameters["weight"]
        w.add_(lora_delta(module).to(w.dtype))
        del module.lora_A, module.lora_B
        for name in ("_lora_rank", "_lora_scale", "_lora_dropout", "_lora_slots", "_lora_mode"):
            module.__dict__.pop(name, None)
        module.__class__ = type(module)._surgery_original
        merged.append(path)
    return merged


__all__ = ["Adapter", "plan_lora", "apply_adapters", "adapter_keys", "merge_adapters", "is_adapted", "lora_delta"]
