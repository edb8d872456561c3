"""The GPU path: each test runs on the CPU here (so its logic is checked everywhere) and on CUDA
where there is one (marker `cuda`, skipped without a GPU, so CI stays green).

    pytest -m cuda            # on a GPU machine: the CUDA variants only

Two-stage runs with bf16 and with fp16 + loss scaler (frozen groups bit-identical, the unfrozen
group moving), fused AdamW, torch.compile recompiling on a mid-run unfreeze, resume after an
interrupt, and predict / export of a run trained on the device.
"""

from __future__ import annotations

import io
import json
import os
import signal

import pytest
import torch
from rich.console import Console

from surgery import load_spec
from surgery.train import TrainingStopped, apply_trainable, prepare, run, train_epoch

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
BASE = {
    "name": "gpu",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10},
    "surgery": [{"insert": "cbam", "at": "layer3"}],
    "groups": [
        {"name": "head", "params": ["@head", "@inserted"], "lr": 1e-2},
        {"name": "body", "params": ["*"], "lr": 1e-3, "unfreeze_at": 1},
    ],
    "train": {"epochs": 2, "batch_size": 16, "limit_batches": 2, "optimizer": {"name": "adamw"}},
    "data": {"name": "fake", "image_size": 32, "num_workers": 0, "subset": {"train": 64, "val": 32}},
}


def spec_on(device: str, **train):
    data = json.loads(json.dumps(BASE))
    data["train"].update(device=device, **train)
    return load_spec(data)


def _body_state(ctx) -> dict[str, torch.Tensor]:
    """The body's parameters and its BatchNorm statistics, copied."""
    body = next(g for g in ctx.built.groups if g.name == "body")
    keys = set(body.params) | {
        f"{m}.{b}" for m in body.norm_modules for b, _ in ctx.model.get_submodule(m).named_buffers()
    }
    return {k: v.detach().clone() for k, v in ctx.model.state_dict().items() if k in keys}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_two_stages_freeze_bit_for_bit_then_train(device, precision, one_thread):
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    ctx = prepare(spec_on(device, precision=precision, channels_last=True))
    assert ctx.runtime.device.type == device and ctx.runtime.precision == precision
    assert ctx.scaler.is_enabled() == (precision == "fp16")
    head = {k: v.clone() for k, v in ctx.model.state_dict().items() if k.startswith("fc.")}
    body = _body_state(ctx)
    for epoch in range(2):
        flags = apply_trainable(ctx.model, ctx.built.groups, epoch)
        ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
        result = train_epoch(ctx, epoch, flags)
        assert result.seen == 32 and torch.isfinite(torch.tensor(result.loss))
        if epoch == 0:  # the body is frozen: bit-identical, BatchNorm statistics included
            after = _body_state(ctx)
            assert all(torch.equal(after[k], v) for k, v in body.items())
            assert any(not torch.equal(ctx.model.state_dict()[k], v) for k, v in head.items())
    after = _body_state(ctx)
    moved = [k for k, v in body.items() if v.is_floating_point() and not torch.equal(after[k], v)]
    assert len(moved) > len(body) // 2  # unfrozen at epoch 1: the body trains


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_is_fused_on_the_device(device):
    ctx = prepare(spec_on(device))
    assert ctx.optimizer.defaults.get("fused") is True
    assert all(p.device.type == device for g in ctx.optimizer.param_groups for p in g["params"])


# the CPU path (aot_eager) is tests/test_train.py::test_compiled_model_trains_a_group_unfrozen_mid_run
@pytest.mark.cuda
@pytest.mark.parametrize("device, backend", [pytest.param("cuda", True, id="cuda-inductor")])
def test_compile_recompiles_once_at_the_unfreeze_and_the_body_then_trains(device, backend, one_thread):
    ctx = prepare(spec_on(device, compile=backend, channels_last=False, precision="fp32"))
    body = _body_state(ctx)
    for epoch in range(2):
        flags = apply_trainable(ctx.model, ctx.built.groups, epoch)
        ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
        train_epoch(ctx, epoch, flags)
        if epoch == 0:
            assert all(torch.equal(_body_state(ctx)[k], v) for k, v in body.items())
    after = _body_state(ctx)
    assert sum(not torch.equal(after[k], v) for k, v in body.items() if v.is_floating_point()) > len(body) // 2
    assert ctx.forward.compilations == 2  # once per trainable set, not once per epoch


@pytest.mark.parametrize("device", DEVICES)
def test_an_interrupted_run_resumes_and_then_predicts_and_exports(device, tmp_path, one_thread):
    from PIL import Image

    from surgery.deploy.export import export_run
    from surgery.deploy.predict import load_run, predict

    spec = spec_on(device, precision="bf16" if device == "cuda" else "fp32")
    out = tmp_path / "run"

    def interrupt(epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == (1, 0):
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the batch, checkpoint, stop

    quiet = Console(file=io.StringIO())
    with pytest.raises(TrainingStopped, match="interrupted in epoch 2/2 after batch 1"):
        run(spec, out, on_step=interrupt, console=quiet)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 1)
    summary = run(spec, out, resume=True, console=quiet)
    assert summary["epochs"] == 2 and summary["device"].startswith(device)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]

    loaded = load_run(out, device)
    assert next(loaded.model.parameters()).device.type == device
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    (prediction,) = list(predict(loaded, [image], topk=3))
    probs = [p for _, p in prediction.top]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    result = export_run(out, "pt2")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
