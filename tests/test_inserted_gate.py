"""The identity gate of an inserted module, fused into one operator (`torch.lerp`): the same outputs
and gradients as the three-operator form it replaced, x + gate * (y - x); exactly x at gate 0."""

from __future__ import annotations

import pytest
import torch
from timm.layers import get_attn

from surgery.model.insert import Inserted


def _three_ops(module: Inserted, x: torch.Tensor) -> torch.Tensor:
    y = module.attn(x)
    return x + module.gate.to(x.dtype) * (y - x)


def _cbam(gate: float) -> Inserted:
    torch.manual_seed(0)
    module = Inserted(get_attn("cbam")(16), identity=True, kind="cbam", target="layer1", position="after")
    with torch.no_grad():
        module.gate.fill_(gate)
    return module


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_closed_gate_is_exactly_the_identity(channels_last):
    x = torch.randn(4, 16, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_cbam(0.0)(x), x)


@pytest.mark.parametrize("gate", [0.3, -0.8, 0.5, 1.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_gradients_match_the_three_operator_form(gate, channels_last):
    module = _cbam(gate)
    x = torch.randn(4, 16, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params = [x, module.gate, *module.attn.parameters()]
    fused, former = module(x), _three_ops(module, x)
    torch.testing.assert_close(fused, former, rtol=1e-6, atol=1e-6)  # within rounding (fused multiply-add)
    fused_grads = torch.autograd.grad(fused.square().sum(), params)
    former_grads = torch.autograd.grad(former.square().sum(), params)
    for a, b in zip(fused_grads, former_grads):  # sums over the batch: rounding scales with their size
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_dtypes_promote_as_before_under_autocast():
    module = _cbam(0.3)
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, former = module(x), _three_ops(module, x)
    assert fused.dtype == former.dtype
    torch.testing.assert_close(fused, former, rtol=2e-2, atol=2e-2)


def test_torchscript_still_compiles_the_gate():
    module = _cbam(0.3).eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))


def test_the_gate_is_one_pass_over_the_map():
    """The gate adds one operator to the inserted module's own (it added three: sub, mul, add)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    module, x = _cbam(0.3), torch.randn(2, 16, 8, 8)
    with torch.no_grad(), Ops() as whole:
        module(x)
    with torch.no_grad(), Ops() as attn:
        module.attn(x)
    added = list(whole.names)
    for name in attn.names:
        added.remove(name)
    # dtype bookkeeping (promote_types, no-op casts) reads no map
    assert [n for n in added if n not in ("promote_types", "_to_copy", "detach", "alias")] == ["lerp"]
