"""Data-parallel training: two gloo processes on the CPU under torchrun, staged unfreezing, checks.

One torchrun launch (about 40 s on two busy cores) runs four scenarios in the same two workers;
the tests below read what they left on disk:

  rewrap     `surgery run` (the CLI) of a spec whose body unfreezes at epoch 1
  norewrap   the same run with the DDP re-wrap disabled: ranks must drift apart and the run must fail
  stopped    rank 0 alone gets SIGINT in epoch 1; both ranks must stop and checkpoint together
  resumed    --resume of `stopped`, which must end exactly where `rewrap` ended, on every rank
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from surgery import load_spec
from surgery.data import make_loader
from surgery.runs import load_safetensors, read_metrics
from surgery.train.distributed import convert_sync_bn, fingerprint, trained_norms, unused_parameters

SPEC = {
    "name": "ddp",
    # dropout draws from each process's own RNG stream; EMA and BatchNorm buffers must stay in step
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False, "args": {"drop_rate": 0.2}},
    "train": {"epochs": 2, "batch_size": 8, "limit_batches": 3, "channels_last": False, "ema": 0.9},
    # 45 val images: two ranks get 23 each, one of them a repeat that must not be counted
    "data": {"name": "digits", "image_size": 32, "num_workers": 0, "subset": {"train": 200, "val": 45}},
    "groups": [
        {"name": "head", "params": ["@head"], "lr": 0.01},
        # with layer_decay: one optimizer param group per layer, all unfrozen by the one re-wrap
        {"name": "body", "params": ["*"], "lr": 0.01, "unfreeze_at": 1, "layer_decay": 0.8},
    ],
}

WORKER = textwrap.dedent("""
    import io, json, os, signal, sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    from rich.console import Console

    import surgery.train.distributed as distributed
    import surgery.train.runner as train  # run() and the prepare() it calls
    from surgery import load_spec
    from surgery.cli import main

    out, spec_path = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    contexts = []
    real_prepare = train.prepare
    def prepare(*args, **kwargs):
        contexts.append(real_prepare(*args, **kwargs))
        return contexts[-1]
    train.prepare = prepare

    def dump(name, result):
        # this rank's final tensors, to compare ranks outside the code under test
        ctx = contexts[-1]
        state = {"model." + k: v.clone() for k, v in ctx.model.state_dict().items()}
        state.update({"ema." + k: v.clone() for k, v in ctx.ema.module.state_dict().items()})
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save(state, out / name / f"rank{rank}.pt")
        (out / name / f"result{rank}.json").write_text(json.dumps(result))

    def go(name, folder, **kwargs):
        try:
            train.run(load_spec(spec_path), out / folder, console=Console(file=io.StringIO()), **kwargs)
            result = {"ok": True}
        except train.TrainingStopped as exc:
            result = {"ok": False, "message": str(exc)}
        dump(name, result)

    # 1. the re-wrap disabled: the wrapper never sees the unfreeze, as if wrapped once at the start
    real_key = distributed.DataParallel.key
    first = {}
    distributed.DataParallel.key = lambda self: first.setdefault(id(self), real_key(self))
    go("norewrap", "norewrap")
    distributed.DataParallel.key = real_key

    # 2. SIGINT to rank 0 only, after epoch 1's first batch: the ranks agree on it before the
    # second batch's backward and stop after it; then resume in the same processes
    def interrupt(epoch, step, loss):
        if (epoch, step) == (1, 0) and rank == 0:
            os.kill(os.getpid(), signal.SIGINT)
    go("stopped", "interrupted", on_step=interrupt)
    if rank == 0:
        state = torch.load(out / "interrupted" / "checkpoints" / "last.pt", weights_only=False)
        (out / "stopped" / "checkpoint.json").write_text(json.dumps({"epoch": state["epoch"], "batch": state["batch"]}))
    go("resumed", "interrupted", resume=True)

    # 3. the real command line, last: it leaves the process group when done
    code = main(["run", spec_path, "--out", str(out / "rewrap")])
    dump("rewrap", {"ok": code == 0, "exit_code": code})
""")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    spec_path = root / "spec.yaml"
    spec_path.write_text(json.dumps(SPEC))  # JSON is YAML
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(root / "worker.py"), str(root / "out"), str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out"


def _ranks(folder) -> tuple[dict, dict]:
    return (torch.load(folder / "rank0.pt", weights_only=False), torch.load(folder / "rank1.pt", weights_only=False))


def _results(folder) -> list[dict]:
    return [json.loads((folder / f"result{r}.json").read_text()) for r in (0, 1)]


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_group_unfrozen_mid_run_ends_bit_identical_on_every_rank(ddp):
    assert all(r["ok"] and r["exit_code"] == 0 for r in _results(ddp / "rewrap"))
    rank0, rank1 = _ranks(ddp / "rewrap")
    assert _differing(rank0, rank1) == []  # parameters, BatchNorm statistics and EMA, bit for bit
    summary = json.loads((ddp / "rewrap" / "summary.json").read_text())
    assert summary["ranks_consistent"] is True
    assert (summary["world_size"], summary["batch_size_per_process"], summary["global_batch_size"]) == (2, 8, 16)
    rows = read_metrics(ddp / "rewrap" / "metrics.jsonl")
    assert [r["trainable"]["body"] for r in rows] == [False, True]
    # resnet10t: the stem is layer 0, layer1.0 .. layer4.0 are 1..4, the head (another group) 5
    assert rows[1]["layer_lr"]["body"] == pytest.approx({str(i): 0.01 * 0.8 ** (5 - i) for i in range(5)})
    # the body really trained after its unfreeze epoch (and identically on both ranks)
    from surgery import build

    initial = build(load_spec(SPEC)).model.state_dict()
    moved = [
        k
        for k in initial
        if k.startswith("layer") and k.endswith("weight") and not torch.equal(initial[k], rank0["model." + k])
    ]
    assert len(moved) > 10


def test_without_the_rewrap_ranks_diverge_and_the_run_fails_loudly(ddp):
    results = _results(ddp / "norewrap")
    assert not any(r["ok"] for r in results)
    assert all("hold different weights after epoch 2" in r["message"] for r in results)
    rank0, rank1 = _ranks(ddp / "norewrap")
    differing = _differing(rank0, rank1)
    assert any(k.startswith("model.layer") for k in differing)  # the body, unfrozen at epoch 1, drifted
    assert not any(k.startswith("model.fc.") for k in differing)  # the head, wrapped from the start, did not
    summary = json.loads((ddp / "norewrap" / "summary.json").read_text())
    assert summary["ranks_consistent"] is False and summary["diverged_tensors"]
    # the diverged epoch was not checkpointed: last.pt still continues at epoch 1
    assert torch.load(ddp / "norewrap" / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1


def test_val_accuracy_under_ddp_counts_every_image_once(ddp):
    summary = json.loads((ddp / "rewrap" / "summary.json").read_text())
    assert summary["val_images"] == 45
    # the same weights scored by one process over the whole val set give the very same accuracy
    from surgery.train import evaluate, prepare

    ctx = prepare(load_spec({**SPEC, "train": {**SPEC["train"], "limit_batches": None}}))
    ctx.model.load_state_dict(load_safetensors(ddp / "rewrap" / "model.safetensors"))
    single = evaluate(ctx)
    assert single.seen == 45
    assert single.acc == summary["final_val_acc"]
    assert single.loss == pytest.approx(summary["final_val_loss"], rel=1e-6)


def test_interrupt_on_one_rank_stops_both_and_resume_matches_the_uninterrupted_run(ddp):
    stopped = _results(ddp / "stopped")
    assert all(not r["ok"] and "interrupted in epoch 2/2 after batch 2 of 3" in r["message"] for r in stopped)
    assert "--resume" in stopped[0]["message"]
    assert json.loads((ddp / "stopped" / "checkpoint.json").read_text()) == {"epoch": 1, "batch": 2}
    assert all(r["ok"] for r in _results(ddp / "resumed"))
    for rank in (0, 1):
        resumed = torch.load(ddp / "resumed" / f"rank{rank}.pt", weights_only=False)
        uninterrupted = torch.load(ddp / "rewrap" / f"rank{rank}.pt", weights_only=False)
        assert _differing(resumed, uninterrupted) == []
    timing = ("images_per_sec", "seconds", "data_wait_fraction")
    rows = [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(ddp / "interrupted" / "metrics.jsonl")
    ]
    reference = [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(ddp / "rewrap" / "metrics.jsonl")
    ]
    assert rows == reference


# --------------------------------------------------------------------------- single-process pieces
def test_unused_parameters_finds_a_dead_branch_and_changes_nothing():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
            self.dead = nn.Linear(4, 4)
            self.frozen = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x).mean((2, 3)) + 0 * self.frozen(self.used(x).mean((2, 3)))

    torch.manual_seed(0)
    net = Net()
    net.frozen.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert unused_parameters(net, x) == ["dead.weight", "dead.bias"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics restored
    assert torch.equal(rng, torch.get_rng_state())


def test_fingerprint_sees_a_one_ulp_change_and_a_swap():
    x = torch.randn(1000)
    nudged = x.clone()
    nudged[500] = torch.nextafter(nudged[500], torch.tensor(float("inf")))
    swapped = x.clone()
    swapped[[1, 2]] = x[[2, 1]]
    prints = fingerprint([x, x.clone(), nudged, swapped, torch.arange(5), torch.tensor(True), x.half()])
    assert torch.equal(prints[0], prints[1])
    assert not torch.equal(prints[0], prints[2]) and not torch.equal(prints[0], prints[3])


def test_val_shards_count_every_item_once():
    dataset = list(range(45))
    total = 0
    for rank in range(4):
        loader = make_loader(
            dataset, batch_size=8, train=False, seed=0, num_workers=0, pin_memory=False, rank=rank, world_size=4
        )
        items = [int(v) for x in loader.epoch(0) for v in x]
        unique = loader.unique_items
        assert len(items) == 12 and unique in (11, 12)
        total += unique
        assert sorted(items[:unique]) == list(range(rank, 45, 4))  # repeats come last
    assert total == 45


def test_sync_batchnorm_keeps_parameters_and_frozen_norms_stay_in_eval_mode():
    from surgery.train import prepare, set_train_mode

    spec = load_spec({**SPEC, "train": {**SPEC["train"], "sync_bn": True}})
    ctx = prepare(spec)  # one process: no conversion here; convert the way the DDP path does
    params = dict(ctx.model.named_parameters())
    model = convert_sync_bn(ctx.model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimizer's objects, same names
    set_train_mode(model, ctx.built.groups, {"head": True, "body": False})
    body_norms = next(g for g in ctx.built.groups if g.name == "body").norm_modules
    assert body_norms and all(not model.get_submodule(p).training for p in body_norms)
    assert trained_norms(model) == []  # nothing to average: frozen, or synchronised already


def test_accumulation_steps_skip_the_all_reduce(tmp_path):
    """train.accumulate: 4 under DDP: gradients are all-reduced on a window's last batch only
    (DDP's no_sync on the others). One gloo process, the all-reduces counted by a comm hook."""
    import torch.distributed as dist

    from surgery.train import apply_trainable, prepare, train_epoch
    from surgery.train.distributed import DataParallel, Distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reduced = {}
        for n in (1, 4):
            spec = load_spec(
                {
                    "model": {"backbone": "timm:test_convnext", "num_classes": 10},
                    "train": {
                        "epochs": 1,
                        "batch_size": 8,
                        "accumulate": n,
                        "limit_batches": 8,
                        "channels_last": False,
                    },
                    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
                }
            )
            ctx = prepare(spec)
            flags = apply_trainable(ctx.model, ctx.built.groups, 0)
            ctx.forward = DataParallel(ctx.model, Distributed())
            with torch.no_grad():
                ctx.forward(torch.zeros(2, 3, 32, 32))  # wraps now, so the hook goes on the DDP that trains
            calls = []

            def hook(state, bucket):
                calls.append(1)  # noqa: B023 - called within this iteration, by its own DDP
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut

            ctx.forward.ddp.register_comm_hook(None, hook)
            train_epoch(ctx, 0, flags)
            reduced[n] = len(calls)
        assert reduced[4] > 0 and reduced[1] == 4 * reduced[4]
    finally:
        dist.destroy_process_group()
