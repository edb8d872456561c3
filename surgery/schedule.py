"""Learning rates and trainable groups over time: pure functions of the spec and the epoch.

The lr of group ``g`` at time ``t`` (``t = epoch + fraction of the epoch done``) is::

    lr(g, t) = g.base_lr(floor(t)) * global_factor(train, t) * group_warmup(g, t) * plateau_factor

Everything here except `Plateau` is a pure function, so ``surgery inspect --schedule`` can print
the whole run before anything trains, and a resumed run recomputes the same numbers from the
epoch alone. `Plateau` is the one piece of state, because it depends on validation losses
nobody knows in advance; it lives in the checkpoint through `Plateau.state_dict`.

Warm-up (global and per group) uses one ramp: linear from ``1/(W+1)`` at its start to ``1`` after
``W`` epochs, i.e. ``(t - start + 1) / (W + 1)``. Sampled per epoch it gives ``1/(W+1), 2/(W+1),
..., W/(W+1)``, then ``1``: no epoch is wasted at lr 0. It equals timm's linear warm-up with
``warmup_lr_init = lr / (W + 1)``.

Importing this module does not import torch.
"""
from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from .spec import GroupSpec, SchedulerSpec, Spec, TrainSpec


def _ramp(t: float, start: float, epochs: int) -> float:
    """The shared linear warm-up: (t - start + 1) / (epochs + 1) inside the warm-up, else 1."""
    if epochs <= 0 or t < start or t >= start + epochs:
        return 1.0
    return (t - start + 1.0) / (epochs + 1.0)


def _time(train: TrainSpec, t: float) -> float:
    """`t` as the schedule sees it: floored to the epoch unless the spec asks for per-step updates."""
    return float(t) if train.scheduler.per_step else float(math.floor(t))


def _decay(sched: SchedulerSpec, epochs: int, t: float) -> float:
    name = sched.name
    if name == "cosine":
        # The cosine starts after the warm-up, so the lr peaks at exactly 1 when warm-up ends
        # (timm: CosineLRScheduler(t_initial=epochs - W, warmup_prefix=True, lr_min=ratio)).
        warm = sched.warmup_epochs
        floor_ = sched.min_lr_ratio
        if t <= warm:
            return 1.0
        if t >= epochs:
            return floor_
        progress = (t - warm) / (epochs - warm)
        return floor_ + (1.0 - floor_) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        # torch StepLR; timm StepLRScheduler with warmup_prefix=False: decays fall on multiples of
        # step_size counted from epoch 0, like milestones, not shifted by the warm-up
        return sched.gamma ** math.floor(t / sched.step_size)
    if name == "multistep":
        # torch MultiStepLR: one factor of gamma per milestone reached (repeats count twice)
        return sched.gamma ** bisect.bisect_right(sorted(sched.milestones), t)
    return 1.0  # none, plateau: plateau reductions come from `Plateau`, not from time


def global_factor(train: TrainSpec, t: float) -> float:
    """The run-wide lr multiplier at time `t`, shared by every group.

    ``none`` and ``plateau`` give 1; ``cosine`` falls from 1 (at the end of warm-up) to
    ``min_lr_ratio`` at the end of the last epoch; ``step`` multiplies by ``gamma`` every
    ``step_size`` epochs and ``multistep`` at each milestone, both counted from epoch 0 (the
    warm-up does not shift them). Every scheduler, ``none``
    included, is multiplied by the linear warm-up over the first ``warmup_epochs`` (see the module
    docstring: from ``1/(W+1)`` up to 1). Without ``per_step``, ``t`` is floored to the epoch so the
    lr changes at epoch boundaries only.

    Args:
        train: ``spec.train`` (defaults filled).
        t: epoch plus the fraction of it done, e.g. ``3.25``.

    Returns:
        The multiplier, in (0, 1].

    Example:
        >>> train = {"epochs": 10, "scheduler": {"name": "cosine", "warmup_epochs": 0,
        ...          "min_lr_ratio": 0.0, "per_step": False}}
        >>> global_factor(train, 5)
        0.5
    """
    sched = train.scheduler
    t = _time(train, t)
    return _ramp(t, 0.0, sched.warmup_epochs) * _decay(sched, train.epochs, t)


def group_warmup(group: GroupSpec, t: float) -> float:
    """The per-group linear warm-up over ``group.warmup_epochs``, counted from its unfreeze epoch.

    1.0 once done, and 1.0 while the group is frozen (its lr is not used then). The caller floors
    `t` when updates are per epoch; `lr_at` does.
    """
    if group.unfreeze_at is None:
        return 1.0
    return _ramp(t, float(group.unfreeze_at), group.warmup_epochs)


def lr_at(group: GroupSpec, train: TrainSpec, t: float, plateau_factor: float = 1.0) -> float:
    """The learning rate of `group` at time `t`.

    Args:
        group: a group of the spec.
        train: ``spec.train``.
        t: epoch plus the fraction done: ``epoch + step / steps_per_epoch``.
        plateau_factor: ``Plateau.current`` for the plateau scheduler, else 1.

    Returns:
        ``base_lr(floor(t)) * global_factor * group_warmup * plateau_factor``. For a frozen group
        this is the lr it would have; it is harmless because frozen parameters have no gradient.

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}})
        >>> lr_at(spec.groups[0], spec.train, 0.0)
        0.001
    """
    t = _time(train, t)
    return group.base_lr(math.floor(t)) * global_factor(train, t) * group_warmup(group, t) * plateau_factor


def trainable_at(group: GroupSpec, epoch: int) -> bool:
    """Whether `group` trains during `epoch` (its unfreeze epoch reached, never for 'never')."""
    return group.trainable(epoch)


def lrs_at(spec: Spec, t: float, plateau_factor: float = 1.0) -> dict[str, float]:
    """`lr_at` for every group of `spec`, by group name (what `surgery.optim.set_lrs` takes)."""
    return {g.name: lr_at(g, spec.train, t, plateau_factor) for g in spec.groups}


def trainable_groups(spec: Spec, epoch: int) -> frozenset[str]:
    """Names of the groups that train during `epoch`."""
    return frozenset(g.name for g in spec.groups if g.trainable(epoch))


def schedule_table(spec: Spec) -> list[dict[str, Any]]:
    """The whole run, one row per epoch, as ``surgery inspect --schedule`` prints it.

    Each row is ``{"epoch": e, "groups": {name: {"trainable": bool, "lr": float}}}`` with the lr at
    the start of the epoch. With the plateau scheduler the lr is shown before any reduction
    (plateau factor 1), since reductions depend on validation losses not yet seen.

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}, "train": {"epochs": 2}})
        >>> schedule_table(spec)[1]
        {'epoch': 1, 'groups': {'all': {'trainable': True, 'lr': 0.001}}}
    """
    return [
        {
            "epoch": epoch,
            "groups": {
                g.name: {"trainable": g.trainable(epoch), "lr": lr_at(g, spec.train, float(epoch))}
                for g in spec.groups
            },
        }
        for epoch in range(spec.train.epochs)
    ]


def unfreeze_events(spec: Spec) -> dict[int, list[str]]:
    """Epochs at which groups start to train (epoch 0 included), each with its groups in spec order.

    Groups with ``unfreeze_at: never`` appear nowhere.

    Example:
        >>> unfreeze_events(spec)  # head from 0, backbone from 3
        {0: ['head'], 3: ['backbone']}
    """
    events: dict[int, list[str]] = {}
    for g in spec.groups:
        if g.unfreeze_at is not None:
            events.setdefault(g.unfreeze_at, []).append(g.name)
    return dict(sorted(events.items()))


class Plateau:
    """Reduce-on-plateau as a multiplier: the one stateful part of the schedule.

    Same rule as ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold=1e-4,
    threshold_mode="rel", cooldown=0, min_lr=0)``: a loss improves when it is below
    ``best * (1 - threshold)``; the factor is multiplied by `factor` once the number of epochs
    without improvement exceeds `patience` (so on the ``patience + 1``-th bad epoch), and the count
    restarts. Unlike torch it tracks a factor rather than each group's lr, so torch's ``eps``
    (skip reductions smaller than 1e-8 in absolute lr) has no counterpart.

    An inactive `Plateau` (any scheduler other than ``plateau``) keeps its factor at 1, so the
    training loop can call `step` every epoch whatever the scheduler.

    Example:
        >>> plateau = Plateau.from_train(spec.train)
        >>> factor = plateau.step(val_loss)      # once per epoch, after validation
        >>> set_lrs(optimizer, lrs_at(spec, t, plateau.current))
    """

    def __init__(self, factor: float = 0.1, patience: int = 3, threshold: float = 1e-4, active: bool = True) -> None:
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.active = active
        self.best = math.inf
        self.bad_epochs = 0
        self.current = 1.0

    @classmethod
    def from_train(cls, train: TrainSpec) -> Plateau:
        """The plateau tracker for ``spec.train``; inactive unless the scheduler is ``plateau``."""
        sched = train.scheduler
        return cls(factor=sched.factor, patience=sched.patience, active=sched.name == "plateau")

    def step(self, val_loss: float) -> float:
        """Record one epoch's validation loss; return the (possibly reduced) factor."""
        if not self.active:
            return self.current
        loss = float(val_loss)
        # NaN compares false, so a NaN loss counts as a bad epoch, as in torch
        if loss < self.best * (1.0 - self.threshold):
            self.best = loss
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.current *= self.factor
            self.bad_epochs = 0
        return self.current

    def state_dict(self) -> dict[str, float | int]:
        """What a checkpoint must keep to resume exactly (the settings come from the spec)."""
        return {"best": self.best, "bad_epochs": self.bad_epochs, "current": self.current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        missing = {"best", "bad_epochs", "current"} - set(state)
        if missing:
            raise KeyError(f"plateau state lacks {sorted(missing)}; was it saved by Plateau.state_dict?")
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.current = float(state["current"])

    def __repr__(self) -> str:
        return (f"Plateau(factor={self.factor}, patience={self.patience}, active={self.active}, "
                f"best={self.best}, bad_epochs={self.bad_epochs}, current={self.current})")


__all__ = ["global_factor", "group_warmup", "lr_at", "trainable_at", "lrs_at", "trainable_groups",
           "schedule_table", "unfreeze_events", "Plateau"]
