"""The training engine: freezing, schedules, equivalence with a hand-written loop, the run directory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from surgery import load_spec
from surgery.data import normalize
from surgery.runs import load_safetensors, read_metrics
from surgery.train import apply_trainable, prepare, run, set_train_mode, train_epoch

TINY = {
    "name": "tiny",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10},
    "train": {"epochs": 2, "batch_size": 16, "limit_batches": 3},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


def _spec(**sections):
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return load_spec(data)


def _snapshot(model: nn.Module, names) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].clone() for k in names}


def _group_keys(ctx, name: str) -> list[str]:
    """Parameters and buffers (BatchNorm running statistics included) of one group."""
    group = next(g for g in ctx.built.groups if g.name == name)
    buffers = [f"{m}.{b}" for m in group.norm_modules for b, _ in ctx.model.get_submodule(m).named_buffers()]
    return list(group.params) + buffers


def test_frozen_group_is_bit_identical_then_trains_from_its_unfreeze_epoch():
    spec = _spec(
        groups=[
            {"name": "head", "params": ["@head"], "lr": 1e-2},
            {"name": "body", "params": ["*"], "lr": 1e-3, "unfreeze_at": 1},
        ]
    )
    ctx = prepare(spec)
    body = _group_keys(ctx, "body")
    assert any("running_mean" in k for k in body)
    before = _snapshot(ctx.model, body)
    head_before = _snapshot(ctx.model, ["fc.weight"])

    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    assert flags == {"head": True, "body": False}
    train_epoch(ctx, 0, flags)
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in body), "a frozen parameter or BN buffer moved"
    assert not torch.equal(head_before["fc.weight"], after["fc.weight"])

    flags = apply_trainable(ctx.model, ctx.built.groups, 1)
    assert flags == {"head": True, "body": True}
    train_epoch(ctx, 1, flags)
    after = ctx.model.state_dict()
    moved = [k for k in body if not torch.equal(before[k], after[k])]
    assert len(moved) > len(body) // 2, "the body did not train after its unfreeze epoch"


def test_norm_train_lets_frozen_batchnorm_update_its_statistics():
    spec = _spec(
        groups=[
            {"name": "head", "params": ["@head"]},
            {"name": "body", "params": ["*"], "unfreeze_at": 1, "norm": "train"},
        ]
    )
    ctx = prepare(spec)
    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    set_train_mode(ctx.model, ctx.built.groups, flags)
    bn = ctx.model.get_submodule("bn1")
    assert bn.training
    before = bn.running_mean.clone()
    train_epoch(ctx, 0, flags)
    assert not torch.equal(before, bn.running_mean)
    assert not bn.weight.requires_grad


def test_run_writes_the_contract_files_and_metrics_match_the_schedule(tmp_path):
    spec = _spec(
        train={"epochs": 3, "scheduler": {"name": "step", "step_size": 2, "gamma": 0.5}},
        groups=[
            {"name": "new", "params": ["@head"], "lr": 1e-3},
            {"name": "body", "params": ["*"], "lr": {0: 1e-4, 2: 5e-5}, "unfreeze_at": 1},
        ],
    )
    out = tmp_path / "run"
    summary = run(spec, out)
    for name in (
        "spec.yaml",
        "load_report.json",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/best.safetensors",
        "model.safetensors",
        "summary.json",
        "classes.json",
        "plots/curves.png",
        "plots/confusion.png",
    ):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["trainable"] for r in rows] == [
        {"new": True, "body": False},
        {"new": True, "body": True},
        {"new": True, "body": True},
    ]
    assert rows[0]["lr"]["new"] == pytest.approx(1e-3)
    assert rows[1]["lr"]["body"] == pytest.approx(1e-4)
    assert rows[2]["lr"]["body"] == pytest.approx(5e-5 * 0.5)  # lr map, then step decay at epoch 2
    for r in rows:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_sec", "seconds"):
            assert isinstance(r[key], float)
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
    # the optimizer really holds the last epoch's lrs
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    lrs = {pg["group"]: pg["lr"] for pg in state["optimizer"]["param_groups"]}
    assert lrs["body"] == pytest.approx(5e-5 * 0.5) and lrs["new"] == pytest.approx(1e-3 * 0.5)
    assert summary["epochs"] == 3 and "torch" in summary["versions"]
    assert json.loads((out / "classes.json").read_text()) == [str(i) for i in range(10)]
    # model.safetensors loads into a model rebuilt from the run's own spec.yaml
    from surgery import build

    rebuilt = build(load_spec(out / "spec.yaml"), state_dict=load_safetensors(out / "model.safetensors"))
    trained = load_safetensors(out / "model.safetensors")
    assert all(torch.equal(v, trained[k]) for k, v in rebuilt.model.state_dict().items())


def test_existing_run_directory_is_never_overwritten_silently(tmp_path):
    from surgery.errors import RunDirError  # a run-directory problem, not a spec mistake (issue 9)

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(RunDirError, match="--resume"):
        run(_spec(), out)
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_two_stage_run_reproduces_a_plain_pytorch_loop_step_for_step(tmp_path):
    """Head only at 1e-2 for epoch 0, then everything (body at 1e-3): the same losses as by hand."""
    spec = _spec(
        train={"epochs": 2, "channels_last": False, "optimizer": {"name": "adamw", "weight_decay": 0.0}},
        groups=[
            {"name": "head", "params": ["fc"], "lr": 1e-2},
            {"name": "body", "params": ["*"], "lr": 1e-3, "unfreeze_at": 1},
        ],
    )
    losses: list[float] = []
    run(spec, tmp_path / "run", on_step=lambda e, s, loss: losses.append(loss))

    # the plain loop: what a careful blog post would write
    from surgery import build
    from surgery.data import build_data, make_loader

    torch.manual_seed(spec.seed)
    model = build(spec).model
    config = {
        "input_size": (3, 32, 32),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "crop_mode": "center",
    }
    data = build_data(spec, config)
    loader = make_loader(
        data.train, batch_size=16, train=True, seed=spec.seed, num_workers=0, pin_memory=False, drop_last=True
    )
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    optimizer = torch.optim.AdamW(
        [{"params": head, "lr": 1e-2, "weight_decay": 0.0}, {"params": body, "lr": 1e-3, "weight_decay": 0.0}]
    )
    plain: list[float] = []
    for epoch in range(2):
        for p in body:
            p.requires_grad_(epoch >= 1)
        model.train()
        if epoch == 0:  # frozen BatchNorm keeps its statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        for step, (x, y) in enumerate(loader.epoch(epoch)):
            if step >= 3:
                break
            x = normalize(x, data.mean, data.std)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            plain.append(loss.item())
    assert len(losses) == len(plain) == 6
    assert losses == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_digits_reaches_real_accuracy(tmp_path):
    # Measured: timm resnet10t from scratch on scikit-learn's digits at 32 px reaches val acc 0.95-0.98
    # after 2-3 epochs (0.978 at epoch 2 in one run); chance is 0.10.
    spec = _spec(train={"epochs": 2, "batch_size": 32, "limit_batches": None, "optimizer": {"lr": 2e-3}})
    summary = run(spec, tmp_path / "run")
    assert summary["best_val_acc"] >= 0.8


def test_compiled_model_trains_a_group_unfrozen_mid_run():
    """pytorch#139476: a frame compiled while a group was frozen must not keep it frozen."""
    spec = _spec(
        train={"compile": "aot_eager"},
        groups=[
            {"name": "head", "params": ["@head"], "lr": 1e-2},
            {"name": "body", "params": ["*"], "lr": 1e-3, "unfreeze_at": 1},
        ],
    )
    ctx = prepare(spec)
    body = list(next(g for g in ctx.built.groups if g.name == "body").params)
    before = _snapshot(ctx.model, body)
    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    train_epoch(ctx, 0, flags)
    assert all(torch.equal(before[k], ctx.model.state_dict()[k]) for k in body)
    flags = apply_trainable(ctx.model, ctx.built.groups, 1)
    train_epoch(ctx, 1, flags)
    after = ctx.model.state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in body) > len(body) // 2
    assert ctx.forward.compilations == 2  # once per trainable set, not once per epoch


def _poison_loss(monkeypatch, call: int) -> None:
    """The training loss is NaN on its `call`-th use (1-based); validation does not use it."""
    calls = {"n": 0}

    class Poisoned(nn.CrossEntropyLoss):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", Poisoned)


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from surgery.train import TrainingStopped

    # epoch 0 trains sanely; the loss of epoch 1's second batch is NaN (an lr of 1e30 did this
    # before the schema bounded learning rates to 10)
    _poison_loss(monkeypatch, call=5)
    spec = _spec(
        train={"channels_last": False, "optimizer": {"name": "sgd"}},
        groups=[{"name": "all", "params": ["*"], "lr": {0: 1e-3, 1: 1e-2}}],
    )
    out = tmp_path / "run"
    with pytest.raises(
        TrainingStopped,
        match=r"the loss became nan in epoch 2, batch 2 of 3; the last good "
        r"checkpoint is .*last\.pt \(end of epoch 1\)",
    ):
        run(spec, out)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0]
    assert not (out / "summary.json").exists()


def test_nonfinite_skip_skips_the_bad_batch_and_the_run_completes(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, call=2)
    spec = _spec(train={"epochs": 1, "nonfinite": "skip", "channels_last": False})
    summary = run(spec, tmp_path / "run")
    assert summary["final"]["skipped_batches"] == 1
    weights = load_safetensors(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # one process: trivially consistent, and said so
    assert (summary["ranks_consistent"], summary["world_size"], summary["global_batch_size"]) == (True, 1, 16)


def test_head_only_stage_on_cached_features_matches_the_uncached_stage(tmp_path):
    groups = [
        {"name": "head", "params": ["@head"], "lr": 1e-2},
        {"name": "body", "params": ["*"], "lr": 1e-3, "unfreeze_at": 2},
    ]
    results = {}
    for setting in ("auto", "off"):
        losses: list[float] = []
        spec = _spec(train={"epochs": 3, "cache_features": setting}, groups=groups)
        summary = run(spec, tmp_path / setting, on_step=lambda e, s, loss: losses.append(loss))  # noqa: B023 - this run
        results[setting] = (losses, summary, load_safetensors(tmp_path / setting / "model.safetensors"))
    cached, uncached = results["auto"], results["off"]
    assert len(cached[0]) == len(uncached[0]) == 9
    # the same images in the same order reach the head; only the batch shapes inside the body differ
    assert cached[0] == pytest.approx(uncached[0], rel=1e-4, abs=1e-5)
    for key, tensor in uncached[2].items():
        assert torch.allclose(cached[2][key], tensor, rtol=1e-3, atol=1e-5), key
    assert cached[1]["final_val_acc"] == pytest.approx(uncached[1]["final_val_acc"], abs=0.01)


def test_feature_cache_is_used_only_when_the_head_input_is_fixed(capsys):
    from surgery.train import use_feature_cache

    head_only = [{"name": "head", "params": ["@head"]}, {"name": "body", "params": ["*"], "unfreeze_at": 1}]
    ctx = prepare(_spec(groups=head_only))
    note = use_feature_cache(ctx, apply_trainable(ctx.model, ctx.built.groups, 0))
    assert ctx.features is not None and "cached" in note
    assert ctx.features.train.shape[0] == len(ctx.data.train)
    # epoch 1: the body trains too, so no cache
    assert use_feature_cache(ctx, apply_trainable(ctx.model, ctx.built.groups, 1)) == "" and ctx.features is None

    ctx = prepare(_spec(groups=head_only, data={"augment": "standard"}))
    note = use_feature_cache(ctx, apply_trainable(ctx.model, ctx.built.groups, 0))
    assert ctx.features is None and "augmentation is random" in note

    ctx = prepare(
        _spec(
            groups=[
                {"name": "head", "params": ["@head"]},
                {"name": "body", "params": ["*"], "unfreeze_at": 1, "norm": "train"},
            ]
        )
    )
    note = use_feature_cache(ctx, apply_trainable(ctx.model, ctx.built.groups, 0))
    assert ctx.features is None and "normalization in training mode" in note


# --------------------------------------------------------------------------- train.accumulate
def _no_batchnorm_spec(batch_size: int, accumulate: int, limit: int):
    # timm's test_convnext: LayerNorm only, so a batch of 32 and four batches of 8 see the same statistics
    return _spec(
        model={"backbone": "timm:test_convnext", "num_classes": 10},
        train={
            "epochs": 2,
            "batch_size": batch_size,
            "accumulate": accumulate,
            "limit_batches": limit,
            "channels_last": False,
            "precision": "fp32",
            "grad_clip": 1.0,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
            "scheduler": {"name": "cosine", "warmup_epochs": 1, "per_step": True},
        },
    )


def test_accumulating_four_batches_of_8_matches_one_batch_of_32(tmp_path):
    """Same images in the same order (the sampler's order does not depend on the batch size), one
    optimizer step per 32 images, the per-step lr at the same fractions of the epoch."""
    lrs: dict[str, list[float]] = {"big": [], "accumulated": []}
    for name, (batch, n, limit) in {"big": (32, 1, 2), "accumulated": (8, 4, 8)}.items():
        spec = _no_batchnorm_spec(batch, n, limit)
        ctx = prepare(spec)
        real_step = ctx.optimizer.step

        def step(*a, _ctx=ctx, _name=name, _real=real_step, **k):
            lrs[_name].append(_ctx.optimizer.param_groups[0]["lr"])
            return _real(*a, **k)

        ctx.optimizer.step = step
        for epoch in range(2):
            train_epoch(ctx, epoch, apply_trainable(ctx.model, ctx.built.groups, epoch))
        lrs[name + "_weights"] = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    assert len(lrs["big"]) == len(lrs["accumulated"]) == 4  # 2 optimizer steps per epoch either way
    assert lrs["big"] == pytest.approx(lrs["accumulated"], rel=1e-12)
    big, accumulated = lrs["big_weights"], lrs["accumulated_weights"]
    for key, tensor in big.items():
        assert torch.allclose(accumulated[key], tensor, rtol=1e-4, atol=1e-6), key


def test_accumulate_one_changes_nothing_and_a_short_last_window_still_steps():
    from surgery.train.loop import accumulation_window

    assert [accumulation_window(s, 10, 4) for s in (0, 3, 4, 8, 9)] == [(0, 4), (0, 4), (4, 4), (8, 2), (8, 2)]
    assert [accumulation_window(s, 3, 1) for s in range(3)] == [(0, 1), (1, 1), (2, 1)]
    spec = _no_batchnorm_spec(8, 3, 4)  # windows of 3 and 1 batches
    ctx = prepare(spec)
    calls = []
    real_step = ctx.optimizer.step
    ctx.optimizer.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
    result = train_epoch(ctx, 0, apply_trainable(ctx.model, ctx.built.groups, 0))
    assert len(calls) == 2 and result.seen == 32
    assert all(p.grad is None for p in ctx.model.parameters())  # nothing half-accumulated is left over


def test_a_stop_mid_window_ends_the_epoch_after_the_window_steps():
    from surgery.train.loop import EpochState

    ctx = prepare(_no_batchnorm_spec(8, 4, 8))
    state = EpochState()
    asked = []
    result = train_epoch(
        ctx,
        0,
        apply_trainable(ctx.model, ctx.built.groups, 0),
        state=state,
        on_step=lambda e, s, loss: asked.append(s),
        stop=lambda: len(asked) >= 2,
    )
    assert result.stopped and state.batch == 4  # the stop came after batch 2; the window of 4 finished


# --------------------------------------------------------------------------- train.mixup, data.augment.erasing
def test_mixup_and_erasing_are_seeded_per_batch_and_leave_the_global_rngs_alone():
    import random

    import numpy as np
    from timm.loss import SoftTargetCrossEntropy

    from surgery.train.mixing import BatchAugment

    spec = _spec(
        train={"batch_size": 8, "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}},
        data={"augment": {"erasing": {"prob": 1.0, "mode": "pixel"}}},
    )
    augment = BatchAugment(spec, 10, torch.device("cpu"))
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4])  # odd: the last image stays itself
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a_x, a_t = augment(x.clone(), y, epoch=1, step=2)
    b_x, b_t = augment(x.clone(), y, epoch=1, step=2)
    c_x, _ = augment(x.clone(), y, epoch=1, step=3)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert torch.equal(a_x, b_x) and torch.equal(a_t, b_t) and not torch.equal(a_x, c_x)
    assert not torch.equal(a_x, x)  # prob 1: every image has an erased rectangle
    assert a_t.shape == (5, 10) and torch.allclose(a_t.sum(1), torch.ones(5))
    assert a_t[4].tolist() == [0.0] * 4 + [1.0] + [0.0] * 5
    assert isinstance(prepare(spec).criterion, SoftTargetCrossEntropy)


def test_mixup_run_reports_dominant_label_accuracy_and_head_only_stages_run_uncached(tmp_path, capsys):
    groups = [
        {"name": "head", "params": ["@head"], "lr": 1e-2},
        {"name": "body", "params": ["*"], "lr": 1e-3, "unfreeze_at": 1},
    ]
    spec = _spec(train={"epochs": 1, "mixup": {"cutmix_alpha": 0.0}}, groups=groups)
    run(spec, tmp_path / "mixup")
    row = read_metrics(tmp_path / "mixup" / "metrics.jsonl")[0]
    assert row["train_acc_basis"] == "dominant label" and 0.0 <= row["train_acc"] <= 1.0
    assert "running uncached: mixup/CutMix (train.mixup) mixes different images every epoch" in capsys.readouterr().out
    from surgery.train import use_feature_cache

    ctx = prepare(_spec(groups=groups, data={"augment": {"erasing": {"prob": 0.25}}}))
    note = use_feature_cache(ctx, apply_trainable(ctx.model, ctx.built.groups, 0))
    assert ctx.features is None and "random erasing (data.augment.erasing)" in note


# --------------------------------------------------------------------------- data.balance
def test_balance_loss_weighs_classes_and_summary_records_counts_and_weights(tmp_path):
    spec = _spec(
        model={"backbone": "timm:resnet10t", "num_classes": 3},
        train={"epochs": 1},
        data={"balance": "loss", "classes": [0, 1, 2], "subset": {"train": 61}},
    )
    summary = run(spec, tmp_path / "run")
    balance = summary["balance"]
    counts = balance["train_counts"]
    assert balance["mode"] == "loss" and sum(counts.values()) == 61
    for name, n in counts.items():  # scikit-learn's 'balanced': n_samples / (n_classes * count)
        assert balance["class_weights"][name] == pytest.approx(61 / (3 * n), rel=1e-6)
    ctx = prepare(spec)
    assert torch.allclose(ctx.criterion.weight, torch.tensor([61 / (3 * n) for n in counts.values()]))


def test_balanced_sampler_keeps_the_head_only_cache_and_its_order(tmp_path):
    from surgery.train import use_feature_cache

    head_only = [{"name": "head", "params": ["@head"]}, {"name": "body", "params": ["*"], "unfreeze_at": 1}]
    ctx = prepare(_spec(groups=head_only, data={"balance": "sampler"}))
    note = use_feature_cache(ctx, apply_trainable(ctx.model, ctx.built.groups, 0))
    assert ctx.features is not None and "cached outputs" in note
    from surgery.train.loop import cached_train_batches

    _, _, labels = next(cached_train_batches(ctx, 0, 0))
    first = ctx.train_loader.batch_indices(0)[0]
    assert labels.tolist() == [int(ctx.data.train.targets[i]) for i in first]
    assert run(_spec(groups=head_only, data={"balance": "sampler"}), tmp_path / "run")["balance"] == {
        "mode": "sampler",
        "train_counts": {str(c): int((ctx.data.train.targets == c).sum()) for c in range(10)},
        "class_weights": None,
    }
