"""BatchNorm statistics after averaging: which norms trained, and their statistics recomputed.

An average of weights is not a network whose BatchNorm statistics are the average of the inputs'
statistics, so soups and SWA recompute them on training data. `torch.optim.swa_utils.update_bn`
does this for every norm of the model with the whole model in train mode; here a norm that was
frozen in the run (its group frozen throughout, ``norm: frozen``) must keep its loaded statistics
and normalise with them during the pass, or every norm after it is calibrated on activations the
model never produces at inference. `recalibrate` is update_bn's procedure (statistics reset,
``momentum=None``: the cumulative average over the batches) on the chosen norms only, every other
module in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(model: nn.Module) -> list[str]:
    """Paths of the BatchNorm modules that keep running statistics."""
    return [p for p, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def trained_norms(model: nn.Module, groups: Sequence[Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The BatchNorms whose statistics moved in a run: all but those of groups with ``norm: frozen``
    that trained in none of `rows` (metrics.jsonl's ``trainable`` record of each epoch).

    Args:
        groups: the run's `ResolvedGroup`s (each with `spec.norm` and `norm_modules`).
        rows: the epochs averaged (SWA) or every epoch of the runs (soups).
    """
    frozen: set[str] = set()
    for g in groups:
        trained = any(bool((r.get("trainable") or {}).get(g.name)) for r in rows)
        if g.spec.norm == "frozen" and not trained:
            frozen.update(g.norm_modules)
    return [p for p in batch_norms(model) if p not in frozen]


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    norms: Sequence[str],
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> int:
    """Recompute the running statistics of `norms` over `batches`; return the batches seen.

    Each chosen norm is reset and set to ``momentum=None`` (the cumulative average, as update_bn),
    in train mode; every other module is in eval mode (frozen norms normalise with their own
    statistics, dropout is off). Modes and momenta are restored after.

    Args:
        batches: model inputs, ready for `forward` (default: the model itself).
    """
    modules = dict(model.named_modules())
    chosen = [modules[p] for p in norms]
    if not chosen:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in chosen}
    model.eval()
    for m in chosen:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for x in batches:
            (forward or model)(x)
            seen += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.train(mode)
    return seen


__all__ = ["batch_norms", "trained_norms", "recalibrate"]
