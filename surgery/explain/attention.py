"""What the inserted modules attend to, read off their own gates, and the model without them.

An attention module of timm's registry ends each branch in an activation named ``gate``
(``create_act_layer(gate_layer)``): its output is the attention itself. Its shape says what
kind it is:

    (N, C, 1, 1), (N, 1, C), (N, C)   channel weights: SE, ECA, CBAM's channel branch, GC, GE
    (N, 1, H, W)                      a spatial map: CBAM's spatial branch
    (N, C, H, W)                      a per-channel spatial gate (GatherExcite with an extent):
                                      shown as its mean over channels, and labelled so

A module without such a gate (a user class that gates with a function, a self-attention
module), or whose gate runs more than once per pass (coord gates height and width with one
module), has no attention to read here; `record_attention` says so instead of inventing one.

`bypass_inserted` gives the model as it would be without its inserted modules: a copy with
each `Inserted` wrapper replaced by `nn.Identity`. The paths stay (so a layer named on the
surgered model names the same place), and every other module and weight is shared in value.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.insert import Inserted


@dataclass
class Gate:
    """One gate's output for one image.

    kind: 'channel' (values: C weights), 'spatial' (values: an H x W map) or 'channel-mean'
    (an H x W map, the mean of a C x H x W gate). path: the gate module, e.g.
    ``layer3.cbam_after.attn.spatial.gate``; branch: its path inside the attention module
    (``spatial.gate``), or '' for the module's only gate.
    """

    path: str
    branch: str
    kind: str
    values: torch.Tensor
    channels: int = 0


@dataclass
class ModuleAttention:
    """What one inserted module attended to in one forward pass.

    gate_value: the `Inserted` wrapper's identity gate (None for ``init: default``): the module's
    output is ``x + gate_value * (attn(x) - x)``, so at 0 what it attends to has no effect yet.
    unreadable: why nothing could be read (no gate module, or a gate of an unexpected shape).
    """

    path: str
    kind: str
    gate_value: float | None
    gates: list[Gate] = field(default_factory=list)
    unreadable: str | None = None


def inserted_modules(model: nn.Module) -> dict[str, Inserted]:
    """Every inserted wrapper in `model`, by path, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Inserted)}


def gate_modules(wrapper: Inserted) -> dict[str, nn.Module]:
    """The attention module's gates, by their path inside it (``channel.gate``, ``gate``)."""
    return {n: m for n, m in wrapper.attn.named_modules() if n.rpartition(".")[2] == "gate"}


def classify_gate(output: torch.Tensor) -> tuple[str, torch.Tensor, int] | None:
    """(kind, values, channels) for one image's gate output (batch dimension removed), or None.

    Example:
        >>> classify_gate(torch.rand(64, 1, 1))[0], classify_gate(torch.rand(1, 8, 8))[0]
        ('channel', 'spatial')
    """
    t = output.detach().float()
    if t.dim() == 3 and t.shape[0] == 1:  # (1, H, W); a 1 x 1 map too: a one-channel module has no channel attention
        return "spatial", t[0], 1
    if t.dim() == 3 and t.shape[1] == t.shape[2] == 1:
        return "channel", t.flatten(), t.shape[0]
    if t.dim() == 3:
        return "channel-mean", t.mean(0), t.shape[0]
    if t.dim() == 1 or (t.dim() == 2 and 1 in t.shape):  # (C,), or ECA's (1, C)
        return "channel", t.flatten(), t.numel()
    return None


@contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, ModuleAttention]]:
    """Hooks on every inserted module's gates while the block runs; the result fills in on exit.

    Only the first forward pass of `model` inside the block is recorded: methods such as
    Score-CAM run the model again on masked copies of the image, which must not replace what
    the model attended to on the image itself. Each recorded tensor is the batch's first image.
    A gate that runs more than once in that pass (CoordAttn gates height and width with one
    module) is reported unreadable: no single output of it is the module's attention.
    """
    wrappers = inserted_modules(model)
    result: dict[str, ModuleAttention] = {}
    seen: dict[str, list[torch.Tensor]] = {}
    done = [False]

    def hook(path: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            if not done[0] and isinstance(output, torch.Tensor):
                seen.setdefault(path, []).append(output.detach()[0].cpu())

        return record

    def finished(module: nn.Module, args: tuple, output: object) -> None:
        done[0] = True

    handles = [model.register_forward_hook(finished)]
    for path, wrapper in wrappers.items():
        for inner, gate in gate_modules(wrapper).items():
            handles.append(gate.register_forward_hook(hook(f"{path}.attn.{inner}")))
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for path, wrapper in wrappers.items():
        result[path] = _read(path, wrapper, seen)


def _read(path: str, wrapper: Inserted, seen: dict[str, list[torch.Tensor]]) -> ModuleAttention:
    gate_value = None if wrapper.gate is None else float(wrapper.gate.detach().float().item())
    entry = ModuleAttention(path=path, kind=wrapper.kind, gate_value=gate_value)
    inner_gates = gate_modules(wrapper)
    if not inner_gates:
        entry.unreadable = (
            f"{type(wrapper.attn).__name__} has no gate module to read "
            "(its attention, if any, is computed by a function, not a module)"
        )
        return entry
    odd = []
    for inner in inner_gates:
        full = f"{path}.attn.{inner}"
        outputs = seen.get(full, [])
        if len(outputs) != 1:
            odd.append(
                f"{inner} did not run"
                if not outputs
                else f"{inner} runs {len(outputs)} times per pass, so no one output of it is the attention"
            )
            continue
        read = classify_gate(outputs[0])
        if read is None:
            odd.append(f"{inner} has an output of shape {list(outputs[0].shape)}")
            continue
        kind, values, channels = read
        branch = inner if len(inner_gates) > 1 else ""
        entry.gates.append(Gate(full, branch, kind, values, channels))
    if not entry.gates:
        entry.unreadable = f"{type(wrapper.attn).__name__}: " + "; ".join(odd)
    return entry


def bypass_inserted(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every inserted module is an `nn.Identity`: the model without
    its inserts, with the same weights everywhere else. The paths of the inserts remain, so a
    layer chosen on the surgered model names the same place in the copy.

    With ``init: identity`` gates still at 0, the copy computes exactly what the surgered model
    does (``x + 0 * (attn(x) - x) == x``); with ``init: default`` it is the backbone the spec
    started from.
    """
    twin = copy.deepcopy(model)
    for path in list(inserted_modules(twin)):
        twin.set_submodule(path, nn.Identity())
    return twin


__all__ = [
    "Gate",
    "ModuleAttention",
    "bypass_inserted",
    "classify_gate",
    "gate_modules",
    "inserted_modules",
    "record_attention",
]
