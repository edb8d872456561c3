"""train.regularize (L2-SP, l2_new, LwF, feature distillation) and the shifted test set (evaluate --shift).

A tiny timm `test_efficientnet` (BatchNorm, a 1000-class head) with random weights saved to a file
plays the pretrained model: the spec loads it with 10 classes, so the head is new and the original
head exists for LwF.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from surgery.errors import SpecError
from surgery.evaluate.shift import CORRUPTIONS, blur_sigma, corrupt
from surgery.runs import load_safetensors, read_metrics
from surgery.spec import load_spec
from surgery.train import prepare
from surgery.train.loop import _forward_loss, apply_trainable, set_train_mode, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "w.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    return str(path)


def spec_for(weights: str, regularize: dict, **train) -> dict:
    return {
        "name": "reg",
        "model": {"backbone": "timm:test_efficientnet", "num_classes": 10, "pretrained": weights},
        "groups": [
            {"name": "head", "params": ["@head"], "lr": 0.01},
            {"name": "body", "params": ["*"], "lr": 0.005, "unfreeze_at": train.pop("body_at", 0)},
        ],
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "limit_batches": 2,
            "channels_last": False,
            "optimizer": {"name": "adamw", "weight_decay": 0.05},
            "regularize": regularize,
            **train,
        },
        "data": {"name": "digits", "image_size": 32, "num_workers": 0},
    }


def stage(ctx, epoch: int = 0):
    """What the runner does at a new trainable set: flags, train modes, the regulariser's update."""
    flags = apply_trainable(ctx.model, ctx.built.groups, epoch, ctx.unfreeze.starts)
    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
    set_train_mode(ctx.model, ctx.built.groups, flags)
    ctx.regularizer.update(ctx.model)
    return flags


def one_batch(ctx):
    x, y = next(iter(ctx.train_loader.epoch(0)))
    from surgery.train.loop import images_to_device

    return _forward_loss(ctx, ctx.forward, images_to_device, x, y, 0, 0, sync=True, grad=True)


# --------------------------------------------------------------------------- L2-SP
def test_l2_sp_is_zero_at_step_0_and_equals_a_direct_computation(weights):
    ctx = prepare(load_spec(spec_for(weights, {"l2_sp": 0.1, "l2_new": 0.02})), device="cpu")
    stage(ctx)
    assert float(ctx.regularizer.terms(None, {}, None)["l2_sp"].detach()) == 0.0
    w0 = torch.load(weights)
    params = dict(ctx.model.named_parameters())
    with torch.no_grad():
        for name in ("conv_stem.weight", "blocks.1.0.conv_exp.weight"):
            params[name].add_(torch.randn_like(params[name]) * 0.1)
    terms = ctx.regularizer.terms(None, {}, None)
    loaded = ctx.built.report.loaded
    direct = sum(((params[n] - w0[n]) ** 2).sum() for n in params if n in loaded)
    assert float(terms["l2_sp"]) == pytest.approx(0.05 * float(direct), rel=1e-5)
    new = sum((p**2).sum() for n, p in params.items() if n not in loaded)
    assert float(terms["l2_new"]) == pytest.approx(0.01 * float(new), rel=1e-5)
    assert {n for n, _ in ctx.regularizer.new} == {"classifier.weight", "classifier.bias"}


def test_l2_sp_takes_the_pretrained_parameters_out_of_weight_decay(weights):
    plain = prepare(load_spec(spec_for(weights, {})), device="cpu").optimizer
    ctx = prepare(load_spec(spec_for(weights, {"l2_sp": 0.1})), device="cpu")
    decay = {n for g in ctx.optimizer.param_groups if g["weight_decay"] for n in g["param_names"]}
    assert decay == {"classifier.weight"}  # the new head keeps its decay; loaded tensors get L2-SP instead
    before = {n for g in plain.param_groups if g["weight_decay"] for n in g["param_names"]}
    assert "conv_stem.weight" in before


# --------------------------------------------------------------------------- distillation
def test_lwf_and_distill_are_zero_at_step_0_and_their_gradient_flows(weights):
    spec = spec_for(weights, {"lwf": {"weight": 1.0, "temperature": 2.0}, "distill": {"at": "blocks.1"}})
    ctx = prepare(load_spec(spec), device="cpu")
    reg = ctx.regularizer
    assert reg.old_head is not None and reg.old_head.out_features == 1000  # the original head's logits
    stage(ctx)
    assert reg.live == {"lwf": True, "distill": True}
    _, _, _, terms = one_batch(ctx)
    assert float(terms["lwf"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["distill"]) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # not a rescaling: the BatchNorm after it would undo that
        ctx.model.get_submodule("conv_stem").weight.add_(torch.randn(ctx.model.conv_stem.weight.shape) * 0.5)
    _, _, _, terms = one_batch(ctx)
    assert float(terms["lwf"]) > 1e-4 and float(terms["distill"]) > 1e-4
    (terms["lwf"] + terms["distill"]).backward()
    assert ctx.model.get_submodule("conv_stem").weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reg.teacher.parameters())


def test_distill_cosine_and_lwf_without_an_original_head_use_the_features(weights, tmp_path):
    state = torch.load(weights)
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")}, headless)
    spec = spec_for(str(headless), {"lwf": {}, "distill": {"at": "blocks.1", "loss": "cosine"}})
    spec["model"]["reset_head"] = True
    ctx = prepare(load_spec(spec), device="cpu")
    assert ctx.regularizer.old_head is None and "head input" in ctx.regularizer.lwf_target
    stage(ctx)
    with torch.no_grad():
        ctx.model.get_submodule("conv_stem").weight.add_(torch.randn(ctx.model.conv_stem.weight.shape) * 0.5)
    _, _, _, terms = one_batch(ctx)
    assert float(terms["lwf"]) > 0 and 0 < float(terms["distill"]) <= 2


def test_a_head_only_stage_skips_the_teacher_and_keeps_the_feature_cache(weights):
    from surgery.train.features import use_feature_cache

    ctx = prepare(load_spec(spec_for(weights, {"lwf": {}}, body_at=1)), device="cpu")
    flags = apply_trainable(ctx.model, ctx.built.groups, 0, ctx.unfreeze.starts)
    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
    assert "head-only stage:" in use_feature_cache(ctx, flags)
    assert "not computed" in ctx.regularizer.update(ctx.model)
    result = train_epoch(ctx, 0, flags)
    assert result.terms == {} and ctx.regularizer.teacher_seconds == 0.0


def test_the_teacher_stays_frozen_and_unchanged_while_the_student_trains(weights):
    ctx = prepare(load_spec(spec_for(weights, {"lwf": {}, "distill": {"at": "blocks.1"}})), device="cpu")
    teacher = {k: v.clone() for k, v in ctx.regularizer.teacher.state_dict().items() if "num_batches" not in k}
    student = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    result = train_epoch(ctx, 0, stage(ctx))
    assert set(result.terms) == {"lwf", "distill"} and result.terms["distill"] > 0
    after = ctx.regularizer.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher.items())  # running statistics too
    assert not torch.equal(ctx.model.state_dict()["conv_stem.weight"], student["conv_stem.weight"])


# --------------------------------------------------------------------------- a run: metrics, resume
def test_a_run_logs_every_term_and_resumes_exactly(weights, tmp_path):
    from runs import train_quietly

    from surgery.train.loop import TrainingStopped

    spec = spec_for(weights, {"l2_sp": 0.1, "l2_new": 0.01, "lwf": {}, "distill": {"at": "blocks.1"}}, body_at=1)
    train_quietly(spec, tmp_path / "whole")
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert rows[0]["reg_lwf"] is None and rows[0]["reg_l2_sp"] == 0.0  # head-only: nothing feeds the head input
    assert all(rows[1][f"reg_{k}"] > 0 for k in ("l2_sp", "l2_new", "lwf", "distill"))

    def interrupt(epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == (1, 0):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped):
        train_quietly(spec, tmp_path / "resumed", on_step=interrupt)
    train_quietly(spec, tmp_path / "resumed", resume=True)
    whole = load_safetensors(tmp_path / "whole" / "model.safetensors")
    resumed = load_safetensors(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    again = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["reg_distill"] for r in again] == [r["reg_distill"] for r in rows]


# --------------------------------------------------------------------------- misuse
MISUSE = [
    ({"l2_sp": 0.1}, {"pretrained": False}, "train.regularize.l2_sp", "loads none"),
    ({"lwf": {}}, {"pretrained": False}, "train.regularize.lwf", "loads none"),
    ({"lwf": {"weight": -1}}, {}, "train.regularize.lwf", "weight"),
    ({"l2_sp": -0.5}, {}, "train.regularize.l2_sp", "minimum"),
    ({"lwf": {"temperature": 0}}, {}, "train.regularize.lwf", "temperature"),
    ({"distill": {"weight": 1}}, {}, "train.regularize.distill", "at"),
    ({"distill": {"at": "blocks.1", "loss": "l1"}}, {}, "train.regularize.distill.loss", "mse"),
]


@pytest.mark.parametrize("regularize, model, where, words", MISUSE)
def test_misuse_is_located(weights, regularize, model, where, words):
    spec = spec_for(weights, regularize)
    spec["model"].update(model)
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert where in str(err.value) and words in str(err.value)


def test_an_unknown_distill_path_is_located_with_the_closest_modules(weights):
    from surgery import validate

    with pytest.raises(SpecError) as err:
        validate(spec_for(weights, {"distill": {"at": "blocks.9"}}))
    text = str(err.value)
    assert "train.regularize.distill.at" in text and "no module 'blocks.9'" in text and "did you mean blocks." in text


def test_l2_new_needs_no_pretrained_weights(weights):
    spec = spec_for(weights, {"l2_new": 0.1})
    spec["model"]["pretrained"] = False
    assert load_spec(spec).train.regularize.needs_pretrained == ()


# --------------------------------------------------------------------------- the shifted test set
def _picture(side: int = 32) -> torch.Tensor:
    image = torch.zeros(3, side, side, dtype=torch.uint8)
    image[:, side // 2 - 2 : side // 2 + 2, 4:-4] = 255  # a horizontal bar: its angle shows the rotation
    image[:, 4:10, 4:10] = 128
    return image


def test_the_corruptions_are_deterministic_and_differ_per_image():
    image = _picture()
    for name in CORRUPTIONS:
        assert torch.equal(corrupt(name, image, 3), corrupt(name, image, 3))
        assert corrupt(name, image, 3).dtype == torch.uint8
    assert not torch.equal(corrupt("noise", image, 3), corrupt("noise", image, 4))
    assert not torch.equal(corrupt("noise", image, 3, seed=1), corrupt("noise", image, 3))


def test_the_corruptions_are_what_the_docs_say():
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    image = _picture()
    for k in range(6):  # rotate: 15 to 30 degrees either way, read back as the angle that fits best
        rotated = corrupt("rotate", image, k).float()
        angles = torch.arange(-40, 41)
        errors = [
            (TF.rotate(image, float(a), interpolation=InterpolationMode.BILINEAR, fill=0).float() - rotated).abs().sum()
            for a in angles
        ]
        assert 15 <= abs(int(angles[int(torch.stack(errors).argmin())])) <= 30
    for side in (32, 64):  # blur: sigma = side / 32, kernel 2 * ceil(3 sigma) + 1
        big = TF.resize(_picture(), [side, side])
        sigma = blur_sigma(side)
        assert sigma == side / 32
        kernel = 2 * int(-(-3 * sigma // 1)) + 1
        assert torch.equal(corrupt("blur", big, 0), TF.gaussian_blur(big, [kernel, kernel], [sigma, sigma]))
    gray = torch.full((3, 64, 64), 128, dtype=torch.uint8)  # noise: std 0.1 of 255, unclipped at mid-gray
    spread = (corrupt("noise", gray, 0).float() - 128).std()
    assert 24.5 < float(spread) < 26.5


def test_evaluate_shift_writes_its_results(tiny_run, tmp_path, capsys):
    from surgery.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["evaluate", str(run), "--shift", "all", "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((run / "eval" / "val-shift" / "shift.json").read_text())  # no test split: val
    assert {k: v for k, v in printed.items() if k != "folder"} == written
    assert list(written["corruptions"]) == ["rotate", "blur", "noise"] and written["images"] == 360
    mean = sum(r["accuracy"] for r in written["corruptions"].values()) / 3
    assert written["mean_accuracy"] == pytest.approx(mean)
    clean = main(["evaluate", str(run), "--split", "val", "--json", "--device", "cpu"])
    assert clean == 0 and json.loads(capsys.readouterr().out)["accuracy"] == written["clean_accuracy"]
    assert main(["evaluate", str(run), "--shift", "fog"]) == 2
    assert "unknown corruption 'fog'" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--shift", "blur", "--data", str(tmp_path)]) == 2
