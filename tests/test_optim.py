"""surgery.train.optim: one optimizer from the start, frozen groups included, decay split timm's way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.errors import SpecError
from surgery.model.groups import ResolvedGroup
from surgery.spec import OptimizerSpec, load_spec
from surgery.train.optim import build_optimizer, build_param_groups, check_optimizer, optimizer_kwargs, set_lrs
from surgery.train.schedule import lr_at, lrs_at, trainable_groups


class Scale(nn.Module):
    """A norm-like layer with a 4-D weight: only the resolver's norm_modules marks it as a norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.scale = Scale(4)
        self.pos = nn.Parameter(torch.zeros(1, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale(self.bn(self.conv(x))).mean((2, 3)) + self.pos
        return self.fc(x)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}


BODY = ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "scale.weight", "pos")
HEAD = ("fc.weight", "fc.bias")


def make_spec(optimizer: dict | None = None, body: dict | None = None, epochs: int = 6):
    return load_spec(
        {
            "model": {"backbone": "torchvision:resnet18"},
            "groups": [
                {"name": "body", "params": "*", "lr": 1e-2, "unfreeze_at": 2, **(body or {})},
                {"name": "head", "params": "fc", "lr": 1e-1, "weight_decay": 0.5},
            ],
            "train": {"epochs": epochs, "optimizer": {"weight_decay": 0.1, **(optimizer or {})}},
        }
    )


def resolved(spec) -> list[ResolvedGroup]:
    body, head = spec.groups
    return [ResolvedGroup(body, BODY, ("bn", "scale")), ResolvedGroup(head, HEAD, ())]


def batch() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        model(batch()).square().mean().backward()
        optimizer.step()


def set_trainable(model: nn.Module, groups: list[ResolvedGroup], names: frozenset[str]) -> None:
    params = dict(model.named_parameters())
    for g in groups:
        for p in g.params:
            params[p].requires_grad_(g.name in names)


# --------------------------------------------------------------------------- param groups
def test_decay_split_and_group_keys():
    torch.manual_seed(0)
    model, spec = Tiny(), make_spec()
    pgs = build_param_groups(model, resolved(spec), spec.train)
    by_key = {(pg["group"], pg["decay"]): pg for pg in pgs}
    assert set(by_key) == {("body", True), ("body", False), ("head", True), ("head", False)}
    assert by_key["body", True]["param_names"] == ["conv.weight"]
    # bias, BN (1-D), a resolver-declared norm with a 4-D weight, the model's no_weight_decay()
    assert by_key["body", False]["param_names"] == ["conv.bias", "bn.weight", "bn.bias", "scale.weight", "pos"]
    assert by_key["head", True]["param_names"] == ["fc.weight"]
    assert by_key["head", False]["param_names"] == ["fc.bias"]
    assert [by_key[k]["weight_decay"] for k in by_key] == [0.1, 0.0, 0.5, 0.0]
    assert by_key["body", True]["lr"] == lr_at(spec.groups[0], spec.train, 0)
    for pg in pgs:
        assert [dict(model.named_parameters())[n] for n in pg["param_names"]] == pg["params"]


def test_every_parameter_exactly_once():
    model, spec = Tiny(), make_spec()
    pgs = build_param_groups(model, resolved(spec), spec.train)
    names = [n for pg in pgs for n in pg["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    ids = [id(p) for pg in pgs for p in pg["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_decay_norm_and_bias_decays_all_but_the_models_own_list():
    model, spec = Tiny(), make_spec(body={"decay_norm_and_bias": True})
    pgs = build_param_groups(model, resolved(spec), spec.train)
    body = {pg["decay"]: pg["param_names"] for pg in pgs if pg["group"] == "body"}
    assert body == {True: ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "scale.weight"], False: ["pos"]}


def test_empty_halves_are_left_out():
    model, spec = Tiny(), make_spec()
    body, head = spec.groups
    groups = [ResolvedGroup(body, BODY + ("fc.weight",), ()), ResolvedGroup(head, ("fc.bias",), ())]
    pgs = build_param_groups(model, groups, spec.train)
    assert [(pg["group"], pg["decay"]) for pg in pgs] == [("body", True), ("body", False), ("head", False)]


@pytest.mark.parametrize(
    "body_params, message",
    [
        (BODY + ("nope",), "not a parameter"),
        (BODY + ("fc.bias",), "in two groups"),
        (BODY[:-1], "in no group"),
    ],
)
def test_resolver_mistakes_are_caught(body_params, message):
    model, spec = Tiny(), make_spec()
    groups = [ResolvedGroup(spec.groups[0], body_params, ()), ResolvedGroup(spec.groups[1], HEAD, ())]
    with pytest.raises(ValueError, match=message):
        build_param_groups(model, groups, spec.train)


# --------------------------------------------------------------------------- frozen groups
OPTIMIZERS = [
    {"name": "sgd", "momentum": 0.9, "nesterov": True},
    {"name": "adam"},
    {"name": "adamw"},
    {"name": "lamb"},
    {"name": "lion"},
    {"name": "lookahead_adamw"},
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o["name"])
def test_frozen_params_untouched_then_train_after_unfreezing(optimizer):
    torch.manual_seed(0)
    model, spec = Tiny(), make_spec(optimizer)
    groups = resolved(spec)
    set_trainable(model, groups, trainable_groups(spec, 0))
    opt = build_optimizer(model, groups, spec.train, spec=spec)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in BODY}
    head = model.fc.weight.detach().clone()

    train_steps(model, opt, 3)  # epochs 0-1: body frozen (momentum, weight decay and all)
    for name, p in model.named_parameters():
        if name in BODY:
            assert p.grad is None
            assert torch.equal(p, frozen[name]), name
    assert not torch.equal(model.fc.weight, head)
    state = opt._base_optimizer.state if hasattr(opt, "_base_optimizer") else opt.state
    assert all(not state.get(p) for n, p in model.named_parameters() if n in BODY)

    set_trainable(model, groups, trainable_groups(spec, 2))  # epoch 2: body unfreezes, same optimizer
    set_lrs(opt, lrs_at(spec, 2))
    train_steps(model, opt, 2)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in BODY)
    changed = {n for n, p in model.named_parameters() if n in BODY and not torch.equal(p, frozen[n])}
    # conv.bias feeds BatchNorm, which cancels it: its gradient is ~0, so it may not move
    assert changed >= set(BODY) - {"conv.bias"}


def test_optimizer_state_survives_a_checkpoint_after_unfreezing():
    torch.manual_seed(0)
    model, spec = Tiny(), make_spec({"name": "adamw"})
    groups = resolved(spec)
    set_trainable(model, groups, trainable_groups(spec, 2))
    opt = build_optimizer(model, groups, spec.train)
    train_steps(model, opt, 2)
    again = build_optimizer(model, groups, spec.train)
    again.load_state_dict(opt.state_dict())
    assert [(pg["group"], pg["decay"]) for pg in again.param_groups] == [
        (pg["group"], pg["decay"]) for pg in opt.param_groups
    ]
    assert again.state[model.conv.weight]["step"] == 2


def test_our_sgd_is_torch_sgd_not_timms_nesterov():
    model, spec = Tiny(), make_spec({"name": "sgd", "momentum": 0.8})
    opt = build_optimizer(model, resolved(spec), spec.train)
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["momentum"], opt.defaults["nesterov"]) == (0.8, False)


def test_betas_eps_and_args_reach_the_optimizer():
    model, spec = Tiny(), make_spec({"name": "adamw", "betas": [0.8, 0.9], "eps": 1e-6, "args": {"amsgrad": True}})
    opt = build_optimizer(model, resolved(spec), spec.train)
    assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["amsgrad"]) == ((0.8, 0.9), 1e-6, True)
    spec = make_spec({"name": "lamb", "betas": [0.8, 0.9]})
    lamb = build_optimizer(model, resolved(spec), spec.train)
    assert type(lamb).__name__ == "Lamb" and lamb.defaults["betas"] == (0.8, 0.9)


# --------------------------------------------------------------------------- kwargs and names
@pytest.mark.parametrize(
    "opt, device, want",
    [
        ({"name": "sgd"}, "cuda", {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "fused": True}),
        ({"name": "sgd"}, "cpu", {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "fused": True}),
        ({"name": "adam"}, "cpu", {"lr": 1e-3, "fused": True}),
        ({"name": "adamw"}, "cuda", {"lr": 1e-3, "fused": True}),
        (
            {"name": "adam", "betas": [0.5, 0.6], "eps": 1e-7},
            "cuda",
            {"lr": 1e-3, "betas": (0.5, 0.6), "eps": 1e-7, "fused": True},
        ),
        ({"name": "adamw"}, "mps", {"lr": 1e-3}),
        ({"name": "adamw", "args": {"foreach": True}}, "cuda", {"lr": 1e-3, "foreach": True}),
        ({"name": "adamw", "args": {"fused": False}}, "cuda", {"lr": 1e-3, "fused": False}),
        ({"name": "lamb"}, "cuda", {"lr": 1e-3, "momentum": 0.9}),  # timm keeps momentum for optimizers with one
        ({"name": "lookahead_sgd"}, "cuda", {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "fused": True}),
    ],
)
def test_optimizer_kwargs(opt, device, want):
    full = OptimizerSpec.parse({"lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "args": {}, **opt})
    assert optimizer_kwargs(full, device) == want


def test_unknown_name_is_located_with_did_you_mean(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: torchvision:resnet18\ntrain:\n  optimizer:\n    name: adamww\n")
    spec = load_spec(path)
    with pytest.raises(SpecError) as info:
        check_optimizer(spec.train, spec=spec)
    err = info.value
    assert (err.path, err.line, err.file) == ("train.optimizer.name", 5, str(path))
    assert "adamw" in err.hint
    with pytest.raises(SpecError, match="unknown optimizer"):  # unlocated, from build_optimizer itself
        build_optimizer(Tiny(), resolved(make_spec()), spec.train)


@pytest.mark.parametrize(
    "optimizer, path, words",
    [
        ({"name": "sgd", "nesterov": True, "momentum": 0}, "train.optimizer.nesterov", "needs a momentum"),
        ({"name": "sgd", "betas": [0.9, 0.99]}, "train.optimizer.betas", "no betas"),
        ({"name": "lion", "eps": 1e-8}, "train.optimizer.eps", "no eps"),
        ({"name": "adamw", "args": {"lr": 0.1}}, "train.optimizer.args.lr", "own place"),
        ({"name": "adamw", "args": {"amsgard": True}}, "train.optimizer.args.amsgard", "no argument"),
        ({"name": "adahessian"}, "train.optimizer.name", "second-order"),
    ],
)
def test_settings_errors(optimizer, path, words):
    spec = make_spec(optimizer)
    with pytest.raises(SpecError, match=words) as info:
        build_optimizer(Tiny(), resolved(spec), spec.train, spec=spec)
    assert info.value.path == path


def test_unknown_arg_hint():
    spec = make_spec({"name": "adamw", "args": {"amsgard": True}})
    with pytest.raises(SpecError) as info:
        check_optimizer(spec.train, spec=spec)
    assert "amsgrad" in info.value.hint


# --------------------------------------------------------------------------- set_lrs
def test_set_lrs_by_spec_group():
    model, spec = Tiny(), make_spec()
    opt = build_optimizer(model, resolved(spec), spec.train)
    set_lrs(opt, {"body": 0.25, "head": 0.5})
    assert {(pg["group"], pg["lr"]) for pg in opt.param_groups} == {("body", 0.25), ("head", 0.5)}
    with pytest.raises(KeyError, match="head"):
        set_lrs(opt, {"body": 0.1})
