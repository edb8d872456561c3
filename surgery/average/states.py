"""Pure functions from state dicts to state dicts: WiSE-FT's interpolation and the mean of soups and SWA.

Only floating-point tensors are averaged; integer buffers (BatchNorm's ``num_batches_tracked``) are
taken from one of the inputs. A tensor that is identical in every input comes out identical, bit for
bit (a frozen layer stays exactly as loaded), and the end points of an interpolation are its inputs.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def _same_keys(states: Sequence[State]) -> None:
    first = states[0]
    for other in states[1:]:
        if set(other) != set(first):
            differ = sorted(set(other) ^ set(first))
            raise ValueError(f"the states hold different tensors: {differ[:5]}")
        for key, tensor in first.items():
            if other[key].shape != tensor.shape:
                raise ValueError(f"{key}: shape {list(other[key].shape)} against {list(tensor.shape)}")


def averaged(tensor: torch.Tensor) -> bool:
    """Is this tensor averaged? Floating-point ones are; step counters and other integers are not."""
    return tensor.is_floating_point()


def interpolate(start: State, end: State, alpha: float, keep: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` for every floating-point tensor (torch.lerp).

    Args:
        start: the state at alpha 0 (WiSE-FT: the model before fine-tuning).
        end: the state at alpha 1 (the fine-tuned run).
        alpha: in [0, 1]; 0 returns `start`'s tensors and 1 `end`'s, bit for bit.
        keep: keys taken from `end` whatever alpha (a head that did not exist before fine-tuning).

    Returns:
        A new state; integer tensors and `keep` come from `end`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]")
    _same_keys([start, end])
    out = {}
    for key, value in end.items():
        origin = start[key]
        if key in keep or not averaged(value) or alpha == 1.0:
            out[key] = value.detach().clone()
        elif alpha == 0.0 or torch.equal(origin, value):
            out[key] = origin.detach().clone()
        else:
            out[key] = torch.lerp(origin.detach().to(value.dtype), value.detach(), alpha)
    return out


def mean_state(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The uniform mean of several states (accumulated in float64, stored in each tensor's dtype).

    A tensor equal in every state is returned as it is; integer tensors come from the first state;
    the mean of one state is that state.
    """
    if not states:
        raise ValueError("no state to average")
    _same_keys(states)
    out = {}
    for key, first in states[0].items():
        values = [s[key].detach() for s in states]
        if not averaged(first) or all(torch.equal(first, v) for v in values[1:]):
            out[key] = first.detach().clone()
        else:
            out[key] = torch.stack([v.double() for v in values]).mean(0).to(first.dtype)
    return out


__all__ = ["State", "averaged", "interpolate", "mean_state"]
