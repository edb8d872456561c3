"""Learning rates and trainable groups over time: pure functions of the spec and the epoch.

The lr of group ``g`` at time ``t`` (``t = epoch + fraction of the epoch done``) is::

    lr(g, t) = g.base_lr(floor(t)) * global_factor(train, t) * group_warmup(g, t) * plateau_factor

Everything here except `Plateau`, `Unfreezing` and `EarlyStop` is a pure function, so
``surgery inspect --schedule`` can print the whole run before anything trains, and a resumed run
recomputes the same numbers from the epoch alone. Those three are the state, because they depend
on validation figures nobody knows in advance; they live in the checkpoint through their
``state_dict``.

Event-driven unfreezing (``unfreeze_at: {plateau: ...}`` or ``{after: GROUP, epochs: N}``) only
decides *when* a group starts: from then on it behaves exactly as a plain ``unfreeze_at`` of
that epoch. Its warm-up counts from the epoch it actually unfroze; an ``{epoch: lr}`` table
counts epochs from the start of the run, whatever unfreezes the group.

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
    from ..spec.sections import GroupSpec, MonitorSpec, SchedulerSpec, Spec, TrainSpec


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


def group_warmup(group: GroupSpec, t: float, start: int | None = None) -> float:
    """The per-group linear warm-up over ``group.warmup_epochs``, counted from its unfreeze epoch.

    `start` is the epoch the group actually unfroze (an event rule's, see `Unfreezing`); None
    means its plain ``unfreeze_at``. 1.0 once done, and 1.0 while the group is frozen or its
    start is not known yet (its lr is not used then). The caller floors `t` when updates are per
    epoch; `lr_at` does.
    """
    start = start if start is not None else group.unfreeze_at
    if start is None:
        return 1.0
    return _ramp(t, float(start), group.warmup_epochs)


def lr_at(group: GroupSpec, train: TrainSpec, t: float, plateau_factor: float = 1.0, start: int | None = None) -> float:
    """The learning rate of `group` at time `t`.

    Args:
        group: a group of the spec.
        train: ``spec.train``.
        t: epoch plus the fraction done: ``epoch + step / steps_per_epoch``.
        plateau_factor: ``Plateau.current`` for the plateau scheduler, else 1.
        start: the epoch the group actually unfroze, for groups with an event rule (see
            `Unfreezing.starts`); None: its plain ``unfreeze_at``.

    Returns:
        ``base_lr(floor(t)) * global_factor * group_warmup * plateau_factor``. For a frozen group
        this is the lr it would have; it is harmless because frozen parameters have no gradient.

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}})
        >>> lr_at(spec.groups[0], spec.train, 0.0)
        0.001
    """
    t = _time(train, t)
    return group.base_lr(math.floor(t)) * global_factor(train, t) * group_warmup(group, t, start) * plateau_factor


def trainable_at(group: GroupSpec, epoch: int, start: int | None = None) -> bool:
    """Whether `group` trains during `epoch`: its unfreeze epoch reached (`start`, an event rule's
    actual epoch, or its plain ``unfreeze_at``); never for 'never' or a rule not fired yet."""
    start = start if start is not None else group.unfreeze_at
    return start is not None and epoch >= start


def lrs_at(
    spec: Spec, t: float, plateau_factor: float = 1.0, starts: Mapping[str, int | None] | None = None
) -> dict[str, float]:
    """`lr_at` for every group of `spec`, by group name (what `surgery.train.optim.set_lrs` takes).

    `starts`: the epoch each group actually unfroze (`Unfreezing.starts`), for event rules."""
    starts = starts or {}
    return {g.name: lr_at(g, spec.train, t, plateau_factor, starts.get(g.name)) for g in spec.groups}


def trainable_groups(spec: Spec, epoch: int, starts: Mapping[str, int | None] | None = None) -> frozenset[str]:
    """Names of the groups that train during `epoch` (`starts` as for `lrs_at`)."""
    starts = starts or {}
    return frozenset(g.name for g in spec.groups if trainable_at(g, epoch, starts.get(g.name)))


def schedule_table(spec: Spec) -> list[dict[str, Any]]:
    """The whole run, one row per epoch, as ``surgery inspect --schedule`` prints it.

    Each row is ``{"epoch": e, "groups": {name: {"trainable": bool, "lr": float}}}`` with the lr at
    the start of the epoch. With the plateau scheduler the lr is shown before any reduction
    (plateau factor 1), since reductions depend on validation losses not yet seen. A group whose
    event rule may have fired by an epoch has ``"trainable": None`` and ``"rule": "plateau
    val_loss/2"`` there (before the earliest epoch it could fire, it is plainly frozen); an
    ``after`` rule whose group has a plain epoch is a plain epoch too.

    Example:
        >>> spec = load_spec({"model": {"backbone": "torchvision:resnet18"}, "train": {"epochs": 2}})
        >>> schedule_table(spec)[1]
        {'epoch': 1, 'groups': {'all': {'trainable': True, 'lr': 0.001}}}
    """
    starts, earliest = unfreeze_epochs(spec), earliest_epochs(spec)

    def cell(g: GroupSpec, epoch: int) -> dict[str, Any]:
        start = starts[g.name]
        lr = lr_at(g, spec.train, float(epoch), start=start)
        if start is None and g.unfreeze_rule is not None and earliest[g.name] is not None and epoch >= earliest[g.name]:
            return {"trainable": None, "lr": lr, "rule": str(g.unfreeze_rule)}
        return {"trainable": trainable_at(g, epoch, start), "lr": lr}

    return [
        {"epoch": epoch, "groups": {g.name: cell(g, epoch) for g in spec.groups}} for epoch in range(spec.train.epochs)
    ]


def unfreeze_events(spec: Spec, starts: Mapping[str, int | None] | None = None) -> dict[int, list[str]]:
    """Epochs at which groups start to train (epoch 0 included), each with its groups in spec order.

    `starts`: the actual epochs (`Unfreezing.starts`); by default what the spec alone says
    (`unfreeze_epochs`). Groups with ``unfreeze_at: never``, or a rule not fired, appear nowhere.

    Example:
        >>> unfreeze_events(spec)  # head from 0, backbone from 3
        {0: ['head'], 3: ['backbone']}
    """
    starts = unfreeze_epochs(spec) if starts is None else starts
    events: dict[int, list[str]] = {}
    for g in spec.groups:
        if starts.get(g.name) is not None:
            events.setdefault(starts[g.name], []).append(g.name)
    return dict(sorted(events.items()))


# --------------------------------------------------------------------------- event rules
def unfreeze_epochs(spec: Spec, fired: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """The epoch each group starts training, as far as it is known.

    A plain ``unfreeze_at`` is its own number. A plateau rule's epoch is known once it fired
    (`fired`: group -> the epoch it trains from). An ``after`` rule's is its group's epoch plus
    ``epochs`` as soon as that one is known, so a chain rooted in a plain epoch is known before the
    run starts. None: never, or not known yet.

    Example:
        >>> unfreeze_epochs(spec)  # new: 0, top: {after: new, epochs: 3}, base: {plateau: {}}
        {'new': 0, 'top': 3, 'base': None}
    """
    fired = fired or {}
    starts: dict[str, int | None] = {g.name: g.unfreeze_at for g in spec.groups}
    rules = [g for g in spec.groups if g.unfreeze_rule is not None]
    for _ in range(len(rules)):  # each pass settles at least one link of every chain (no cycles: check_rules)
        for g in rules:
            rule = g.unfreeze_rule
            if rule.plateau is not None:
                starts[g.name] = fired.get(g.name)
            elif starts.get(rule.after) is not None:
                starts[g.name] = starts[rule.after] + rule.epochs
    return starts


def earliest_epochs(spec: Spec) -> dict[str, int | None]:
    """The first epoch each group could train: its plain epoch, or the earliest its rule can fire.

    A plateau rule watches from epoch 0 (or from its ``after`` group's epoch) and needs a first
    value and then ``patience`` epochs without improvement: it fires at the end of epoch
    ``since + patience`` at the earliest, and the group trains from the next. None: never.
    """
    earliest: dict[str, int | None] = {g.name: g.unfreeze_at for g in spec.groups}
    rules = [g for g in spec.groups if g.unfreeze_rule is not None]
    for _ in range(len(rules)):
        for g in rules:
            rule = g.unfreeze_rule
            since = 0 if rule.after is None else earliest.get(rule.after)
            if since is not None:
                earliest[g.name] = since + (rule.plateau.patience + 1 if rule.plateau is not None else rule.epochs)
    return earliest


def check_rules(spec: Spec) -> list[tuple[tuple, str]]:
    """The checks of event rules and ``train.early_stop`` that relate them to other keys.

    Returns:
        (key path, text) warnings: a rule or an early stop that cannot act within this run.

    Raises:
        SpecError: an ``after`` naming an unknown group, groups waiting for each other in a
            cycle, a chain that waits for a group that never unfreezes, ``epochs`` without
            ``after`` or beside ``plateau``, or ``val_map`` watched in a single-label run.
    """
    from ..errors import did_you_mean

    names = [g.name for g in spec.groups]
    by_name = {g.name: g for g in spec.groups}
    for g in spec.groups:
        rule = g.unfreeze_rule
        if rule is None:
            continue
        where = rule.where
        if rule.plateau is None and rule.epochs is None:
            raise spec.error(
                where,
                f"the unfreeze rule of group {g.name!r} says neither when nor on what event",
                found=f"after: {rule.after}" if rule.after else "{}",
                expected="{after: GROUP, epochs: N} or {plateau: {monitor, patience}} (optionally with after: GROUP)",
            )
        if rule.plateau is not None and rule.epochs is not None:
            raise spec.error(
                where + ("epochs",),
                "an unfreeze rule waits for a plateau or for a number of epochs, not both",
                found=f"epochs: {rule.epochs} beside plateau",
                expected="either {after: GROUP, epochs: N} or {after: GROUP, plateau: {...}}",
            )
        if rule.epochs is not None and rule.after is None:
            raise spec.error(
                where + ("epochs",),
                "`epochs` counts from the epoch another group unfroze: it needs `after`",
                found=f"epochs: {rule.epochs}",
                expected="{after: GROUP, epochs: N}",
                hint=f"for a fixed epoch write unfreeze_at: {rule.epochs}",
            )
        if rule.after is not None and rule.after not in by_name:
            others = [n for n in names if n != g.name]
            raise spec.error(
                where + ("after",),
                f"group {g.name!r} waits for a group {rule.after!r} that the spec does not have",
                found=rule.after,
                expected="one of " + ", ".join(others),
                hint=did_you_mean(rule.after, others),
            )
        if rule.plateau is not None:
            _check_monitor(spec, rule.plateau, where + ("plateau", "monitor"))
    for g in spec.groups:  # follow every chain to its root: a cycle, or a root that never unfreezes
        chain, current = [g.name], g
        while current.unfreeze_rule is not None and current.unfreeze_rule.after is not None:
            current = by_name[current.unfreeze_rule.after]
            if current.name in chain:
                loop = chain[chain.index(current.name) :] + [current.name]
                raise spec.error(
                    g.unfreeze_rule.where + ("after",),
                    "groups wait for each other in a cycle: " + " -> ".join(loop),
                    found=" -> ".join(loop),
                    expected="chains of after that end at a group with a plain epoch or a plateau rule",
                )
            chain.append(current.name)
        if current is not g and current.unfreeze_rule is None and current.unfreeze_at is None:
            raise spec.error(
                g.unfreeze_rule.where + ("after",),
                f"group {g.name!r} waits for {current.name!r}, which never unfreezes",
                found=" -> ".join(chain),
                expected="a chain that ends at a group that trains",
                hint=f"give {current.name!r} an unfreeze epoch, or {g.name!r} a plain one",
            )
    if spec.train.early_stop is not None:
        _check_monitor(spec, spec.train.early_stop, ("train", "early_stop", "monitor"))
    return _rule_warnings(spec)


def _check_monitor(spec: Spec, watch: MonitorSpec, where: tuple) -> None:
    if watch.monitor == "val_map" and not spec.data.multi_label:
        raise spec.error(
            where,
            "val_map (mean average precision) is measured in multi-label runs only",
            found="val_map",
            expected="val_loss or val_acc, or data.multi_label: true",
        )


def _rule_warnings(spec: Spec) -> list[tuple[tuple, str]]:
    epochs, warnings = spec.train.epochs, []
    known, earliest = unfreeze_epochs(spec), earliest_epochs(spec)
    for g in spec.groups:
        first = earliest[g.name]
        if g.unfreeze_rule is not None and known[g.name] is None and first is not None and first >= epochs:
            warnings.append(
                (
                    g.unfreeze_rule.where,
                    f"the rule of group {g.name!r} ({g.unfreeze_rule}) can fire "
                    f"at epoch {first} at the earliest, after the last epoch ({epochs - 1}): it stays "
                    "frozen for this whole run",
                )
            )
    stop = spec.train.early_stop
    if stop is not None:
        if stop.patience >= epochs:
            warnings.append(
                (
                    ("train", "early_stop", "patience"),
                    f"a patience of {stop.patience} epochs in a run of {epochs}: early stopping can never end it",
                )
            )
    return warnings


class Watch:
    """Patience on one validation figure: the rule plateau unfreezing and early stopping share.

    An epoch improves when its value beats the best so far by more than ``min_delta`` (lower for
    val_loss; higher for val_acc and val_map): Lightning's EarlyStopping rule. The watch fires
    once ``patience`` epochs in a row have not improved (Keras and Lightning count the same way;
    torch's ReduceLROnPlateau waits one epoch more). A non-finite value never improves.

    Example:
        >>> watch = Watch(MonitorSpec("val_loss", patience=2))
        >>> [watch.update(e, v) for e, v in enumerate([1.0, 0.9, 0.95, 0.92])]
        [False, False, False, True]
    """

    def __init__(self, spec: MonitorSpec) -> None:
        self.spec = spec
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        delta = self.spec.min_delta
        return value > self.best + delta if self.spec.higher_is_better else value < self.best - delta

    def update(self, epoch: int, value: float) -> bool:
        """Record one epoch's value; True when the watch fires (patience used up)."""
        value = float(value)
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.spec.patience

    def reset(self) -> None:
        self.best, self.best_epoch, self.bad_epochs = None, None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


class Unfreezing:
    """When each group starts training, with event rules decided as the run goes.

    `starts` is what every per-epoch decision reads (`apply_trainable`, `lrs_at`): the plain
    epochs, each ``after`` chain, and every plateau rule once it fired. A plateau rule watches its
    monitor from epoch 0, or from the epoch its ``after`` group unfroze; when it fires after epoch
    E, the group trains from E + 1. What fired, and each watch, live in the checkpoint, so a
    resumed run keeps the epochs decided before it stopped.

    Example:
        >>> unfreezing = Unfreezing(spec)
        >>> fired = unfreezing.step(epoch, row)   # once per epoch, after validation
        >>> flags = apply_trainable(model, groups, epoch + 1, unfreezing.starts)
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.fired: dict[str, int] = {}
        self.watches = {
            g.name: Watch(g.unfreeze_rule.plateau)
            for g in spec.groups
            if g.unfreeze_rule is not None and g.unfreeze_rule.plateau is not None
        }
        self._earliest = earliest_epochs(spec)

    @property
    def starts(self) -> dict[str, int | None]:
        """The epoch each group trains from as known now (None: never, or not decided yet)."""
        return unfreeze_epochs(self.spec, self.fired)

    def step(self, epoch: int, row: Mapping[str, Any]) -> list[str]:
        """Feed `epoch`'s validation figures; return the groups whose plateau rule fired now
        (they train from ``epoch + 1``)."""
        starts, fired = self.starts, []
        for g in self.spec.groups:
            watch = self.watches.get(g.name)
            if watch is None or g.name in self.fired:
                continue
            after = g.unfreeze_rule.after
            since = 0 if after is None else starts.get(after)
            if since is None or epoch < since:
                continue  # its after group has not unfrozen yet: nothing to watch
            if watch.update(epoch, row[watch.spec.monitor]):
                self.fired[g.name] = epoch + 1
                fired.append(g.name)
        return fired

    def waiting(self, epoch: int) -> list[str]:
        """Groups that may still start training within this run after `epoch`: a known start still
        ahead, or a rule not decided yet that can fire in time."""
        starts, total = self.starts, self.spec.train.epochs
        out = []
        for g in self.spec.groups:
            start = starts[g.name]
            if start is None and g.unfreeze_rule is not None:
                first = self._earliest[g.name]
                if first is not None and max(first, epoch + 1) < total:
                    out.append(g.name)
            elif start is not None and epoch < start < total:
                out.append(g.name)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"fired": dict(self.fired), "watches": {n: w.state_dict() for n, w in self.watches.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fired = {str(n): int(e) for n, e in state["fired"].items()}
        for name, watch in state["watches"].items():
            self.watches[name].load_state_dict(watch)


class EarlyStop:
    """``train.early_stop``: end the run when the monitor stops improving in its last stage.

    It counts only once no group is waiting to unfreeze (`Unfreezing.waiting`): while one is, the
    watch is reset, so a plateau that should unfreeze a group never ends the run first, and
    figures from before the last unfreeze (another trainable set) are never compared with later
    ones. A stop decided after the last epoch is no stop (nothing is cut short).
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec.train.early_stop
        self.total = spec.train.epochs
        self.watch = Watch(self.spec) if self.spec is not None else None
        self.stopped_at: int | None = None  # the last epoch trained, once it stopped

    def step(self, epoch: int, row: Mapping[str, Any], waiting: bool) -> bool:
        """Feed `epoch`'s figures; True when the run stops after this epoch."""
        if self.watch is None or self.stopped_at is not None:
            return self.stopped_at is not None
        if waiting:
            self.watch.reset()
            return False
        if self.watch.update(epoch, row[self.spec.monitor]) and epoch + 1 < self.total:
            self.stopped_at = epoch
        return self.stopped_at is not None

    def record(self, weights_epoch: int | None) -> dict[str, Any] | None:
        """What summary.json says of it: None unless the run stopped early."""
        if self.stopped_at is None:
            return None
        return {
            "epoch": self.stopped_at,
            "monitor": self.spec.monitor,
            "patience": self.spec.patience,
            "min_delta": self.spec.min_delta,
            "best_epoch": self.watch.best_epoch,
            "best_value": self.watch.best,
            "weights_epoch": weights_epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_at": self.stopped_at, "watch": self.watch.state_dict() if self.watch else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stopped_at = None if state["stopped_at"] is None else int(state["stopped_at"])
        if self.watch is not None and state.get("watch") is not None:
            self.watch.load_state_dict(state["watch"])


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
        return (
            f"Plateau(factor={self.factor}, patience={self.patience}, active={self.active}, "
            f"best={self.best}, bad_epochs={self.bad_epochs}, current={self.current})"
        )


__all__ = [
    "global_factor",
    "group_warmup",
    "lr_at",
    "trainable_at",
    "lrs_at",
    "trainable_groups",
    "schedule_table",
    "unfreeze_events",
    "unfreeze_epochs",
    "earliest_epochs",
    "check_rules",
    "Plateau",
    "Watch",
    "Unfreezing",
    "EarlyStop",
]
