"""surgery.train.schedule: lr and trainability as pure functions of the spec and time."""

from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler

from surgery.spec import load_spec
from surgery.train.schedule import (
    Plateau,
    global_factor,
    group_warmup,
    lr_at,
    lrs_at,
    schedule_table,
    trainable_at,
    trainable_groups,
    unfreeze_events,
)

BACKBONE = {"backbone": "torchvision:resnet18"}


def make_spec(groups: list | None = None, epochs: int = 10, **scheduler) -> object:
    data = {"model": BACKBONE, "train": {"epochs": epochs, "scheduler": scheduler}}
    if groups is not None:
        data["groups"] = groups
    return load_spec(data)


def train_of(epochs: int = 10, **scheduler) -> dict:
    return make_spec(epochs=epochs, **scheduler).train


def one_param_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


# --------------------------------------------------------------------------- global factor
def test_none_is_one_everywhere():
    train = train_of(name="none")
    assert [global_factor(train, t) for t in (0, 0.5, 3, 9.99)] == [1.0] * 4


@pytest.mark.parametrize("warmup, min_ratio", [(0, 0.0), (0, 0.1), (2, 0.0), (3, 0.05)])
def test_cosine_per_epoch_matches_timm(warmup, min_ratio):
    epochs = 12
    train = train_of(epochs, name="cosine", warmup_epochs=warmup, min_lr_ratio=min_ratio)
    timm_sched = CosineLRScheduler(
        one_param_optimizer(),
        t_initial=epochs - warmup,
        lr_min=min_ratio,
        warmup_t=warmup,
        warmup_lr_init=1.0 / (warmup + 1),
        warmup_prefix=True,
    )
    for epoch in range(epochs):
        assert global_factor(train, epoch) == pytest.approx(timm_sched._get_lr(epoch)[0], abs=1e-12)
        # without per_step, the lr holds for the whole epoch
        assert global_factor(train, epoch + 0.7) == global_factor(train, epoch)


def test_cosine_matches_torch_without_warmup():
    epochs = 8
    train = train_of(epochs, name="cosine", min_lr_ratio=0.1)
    opt = one_param_optimizer()
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.1)
    for epoch in range(epochs):
        assert global_factor(train, epoch) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        torch_sched.step()


def test_cosine_per_step_matches_timm_step_updates():
    epochs, steps, warmup = 5, 4, 1
    train = train_of(epochs, name="cosine", warmup_epochs=warmup, min_lr_ratio=0.0, per_step=True)
    timm_sched = CosineLRScheduler(
        one_param_optimizer(),
        t_initial=(epochs - warmup) * steps,
        warmup_t=warmup * steps,
        warmup_lr_init=1.0 / (warmup + 1),
        warmup_prefix=True,
        t_in_epochs=False,
    )
    for update in range(epochs * steps):
        assert global_factor(train, update / steps) == pytest.approx(timm_sched._get_lr(update)[0], abs=1e-12)


def test_cosine_reaches_min_ratio_at_the_end_of_the_run():
    train = train_of(10, name="cosine", min_lr_ratio=0.2, per_step=True)
    assert global_factor(train, 0) == 1.0
    assert global_factor(train, 10) == pytest.approx(0.2)
    assert global_factor(train, 9.999) > 0.2


@pytest.mark.parametrize("warmup", [0, 2])
def test_step_matches_torch_and_timm(warmup):
    epochs = 12
    train = train_of(epochs, name="step", step_size=4, gamma=0.5, warmup_epochs=warmup)
    opt = one_param_optimizer()
    torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    timm_sched = StepLRScheduler(
        one_param_optimizer(),
        decay_t=4,
        decay_rate=0.5,
        warmup_t=warmup,
        warmup_lr_init=1.0 / (warmup + 1),
        warmup_prefix=False,
    )
    for epoch in range(epochs):
        assert global_factor(train, epoch) == pytest.approx(timm_sched._get_lr(epoch)[0], abs=1e-12)
        if epoch >= warmup:
            assert global_factor(train, epoch) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        torch_sched.step()


def test_multistep_matches_torch():
    epochs = 10
    train = train_of(epochs, name="multistep", milestones=[6, 3], gamma=0.1)
    opt = one_param_optimizer()
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6], gamma=0.1)
    for epoch in range(epochs):
        assert global_factor(train, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        torch_sched.step()


@pytest.mark.parametrize("name", ["none", "plateau", "step", "cosine"])
def test_warmup_ramps_from_one_over_w_plus_one(name):
    train = train_of(10, name=name, warmup_epochs=3, step_size=100)
    got = [global_factor(train, e) for e in range(5)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    per_step = train_of(10, name=name, warmup_epochs=3, step_size=100, per_step=True)
    assert global_factor(per_step, 0.5) == pytest.approx(1.5 / 4)


# --------------------------------------------------------------------------- groups
def test_group_warmup_counts_from_unfreeze_epoch():
    spec = make_spec(
        [
            {"name": "head", "params": "fc"},
            {"name": "body", "params": "*", "unfreeze_at": 2, "warmup_epochs": 2},
            {"name": "stem", "params": "conv1", "unfreeze_at": "never", "warmup_epochs": 2},
        ]
    )
    head, body, stem = spec.groups
    assert [group_warmup(body, t) for t in (0, 1, 2, 3, 3.5, 4, 9)] == pytest.approx(
        [1, 1, 1 / 3, 2 / 3, 2.5 / 3, 1, 1]
    )
    assert group_warmup(head, 0) == 1.0
    assert group_warmup(stem, 2) == 1.0
    assert [trainable_at(body, e) for e in range(4)] == [False, False, True, True]
    assert not any(trainable_at(stem, e) for e in range(10))
    assert trainable_groups(spec, 1) == {"head"}
    assert trainable_groups(spec, 2) == {"head", "body"}


def test_lr_at_multiplies_base_lr_global_group_warmup_and_plateau():
    spec = make_spec(
        [
            {"name": "head", "params": "fc", "lr": {0: 1e-2, 4: 1e-3}},
            {"name": "body", "params": "*", "lr": 1e-4, "unfreeze_at": 2, "warmup_epochs": 1},
        ],
        epochs=8,
        name="step",
        step_size=3,
        gamma=0.5,
    )
    head, body = spec.groups
    cases = [  # (t, head lr, body lr)
        (0, 1e-2, 1e-4),
        (2, 1e-2, 1e-4 * 0.5),  # body's first epoch: half its lr
        (3, 1e-2 * 0.5, 1e-4 * 0.5),  # step decay; body warm-up done
        (4, 1e-3 * 0.5, 1e-4 * 0.5),  # head's own lr map
        (6.9, 1e-3 * 0.25, 1e-4 * 0.25),  # floored to epoch 6
    ]
    for t, want_head, want_body in cases:
        assert lr_at(head, spec.train, t) == pytest.approx(want_head)
        assert lr_at(body, spec.train, t) == pytest.approx(want_body)
    assert lr_at(head, spec.train, 0, plateau_factor=0.1) == pytest.approx(1e-3)
    assert lrs_at(spec, 4) == pytest.approx({"head": 5e-4, "body": 5e-5})


def test_per_step_moves_within_epoch_for_warmups_only():
    spec = make_spec(
        [{"name": "a", "params": "*", "lr": {0: 1.0, 2: 0.5}, "warmup_epochs": 2}], epochs=4, per_step=True
    )
    (g,) = spec.groups
    # base lr map stays piecewise constant per epoch; the group's warm-up is per step
    assert lr_at(g, spec.train, 0.5) == pytest.approx(1.5 / 3)
    assert lr_at(g, spec.train, 1.99) == pytest.approx(2.99 / 3)
    assert lr_at(g, spec.train, 2.5) == 0.5


# --------------------------------------------------------------------------- tables
def test_schedule_table_rows():
    spec = make_spec(
        [
            {"name": "head", "params": "fc", "lr": 1e-3},
            {"name": "body", "params": "*", "lr": 1e-4, "unfreeze_at": 2, "warmup_epochs": 1},
            {"name": "stem", "params": "conv1", "unfreeze_at": "never"},
        ],
        epochs=4,
        name="multistep",
        milestones=[3],
    )
    table = schedule_table(spec)
    assert [row["epoch"] for row in table] == [0, 1, 2, 3]
    assert [row["groups"]["body"]["trainable"] for row in table] == [False, False, True, True]
    assert [row["groups"]["head"]["lr"] for row in table] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    assert [row["groups"]["body"]["lr"] for row in table] == pytest.approx([1e-4, 1e-4, 5e-5, 1e-5])
    assert not any(row["groups"]["stem"]["trainable"] for row in table)
    assert set(table[0]["groups"]) == {"head", "body", "stem"}


def test_unfreeze_events():
    spec = make_spec(
        [
            {"name": "head", "params": "fc"},
            {"name": "late", "params": "layer4", "unfreeze_at": 3},
            {"name": "mid", "params": "layer3", "unfreeze_at": 3},
            {"name": "body", "params": "*", "unfreeze_at": 1},
            {"name": "stem", "params": "conv1", "unfreeze_at": "never"},
        ]
    )
    assert unfreeze_events(spec) == {0: ["head"], 1: ["body"], 3: ["late", "mid"]}
    assert list(unfreeze_events(spec)) == [0, 1, 3]


# --------------------------------------------------------------------------- plateau
LOSSES = [1.0, 0.9, 0.9, 0.89995, 0.91, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, float("nan"), 0.5, 0.6, 0.6, 0.6]


@pytest.mark.parametrize("patience, factor", [(0, 0.5), (1, 0.1), (2, 0.5), (3, 0.2)])
def test_plateau_matches_torch(patience, factor):
    opt = one_param_optimizer()
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience)
    plateau = Plateau(factor=factor, patience=patience)
    for loss in LOSSES:
        reference.step(loss)
        assert plateau.step(loss) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert plateau.current < 1.0


def test_plateau_from_train_and_inactive():
    train = train_of(name="plateau", factor=0.5, patience=1)
    plateau = Plateau.from_train(train)
    assert (plateau.factor, plateau.patience, plateau.active) == (0.5, 1, True)
    idle = Plateau.from_train(train_of(name="cosine"))
    assert [idle.step(loss) for loss in LOSSES] == [1.0] * len(LOSSES)


def test_plateau_state_round_trip_resumes_identically():
    whole = Plateau(factor=0.5, patience=1)
    first = Plateau(factor=0.5, patience=1)
    for loss in LOSSES[:7]:
        whole.step(loss)
        first.step(loss)
    resumed = Plateau(factor=0.5, patience=1)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.step(x) for x in LOSSES[7:]] == [whole.step(x) for x in LOSSES[7:]]
    with pytest.raises(KeyError):
        resumed.load_state_dict({"best": 1.0})


def test_plateau_state_holds_infinity_before_first_loss():
    state = Plateau().state_dict()
    assert state == {"best": math.inf, "bad_epochs": 0, "current": 1.0}
