"""The CUDA path, measured: what each of bf16/fp16 autocast, channels_last and torch.compile gives.

    python benchmarks/gpu.py                         # resnet50 + CBAM after layer3, 224 px, batch 128
    python benchmarks/gpu.py --backbone torchvision:resnet18 --batch 256 --json gpu.json

Runs `surgery`'s own training step (prepare + train_epoch on FakeData-shaped digits, no files
written) under several settings, one after another in this process, and prints images/s for each
and the ratio to the fp32 NCHW eager baseline. Without a CUDA device it says so and exits 0:
the CPU figures are benchmarks/loops.py's job.

Anchor: timm's own published training benchmark (results/benchmark-train-amp-nhwc-pt112-cu113-
rtx3090.csv in pytorch-image-models) gives resnet50 1,218 samples/s and resnet18 3,482 samples/s
at 224 px, AMP, channels_last, batch 512 on one RTX 3090; an A100 is typically 1.5-2.5x that.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SETTINGS = [
    ("fp32 NCHW eager", {"precision": "fp32", "channels_last": False, "compile": False}),
    ("fp32 channels_last", {"precision": "fp32", "channels_last": True, "compile": False}),
    ("bf16 channels_last", {"precision": "bf16", "channels_last": True, "compile": False}),
    ("fp16 channels_last", {"precision": "fp16", "channels_last": True, "compile": False}),
    ("bf16 channels_last compiled", {"precision": "bf16", "channels_last": True, "compile": True}),
]


def measure(backbone: str, size: int, batch: int, steps: int, train: dict) -> float:
    import torch

    from surgery import load_spec
    from surgery.train import apply_trainable, prepare, train_epoch

    spec = load_spec({
        "name": "gpu-bench",
        "model": {"backbone": backbone, "num_classes": 10},
        "surgery": [{"insert": "cbam", "at": "layer3", "init": "identity"}],
        "train": {"epochs": 2, "batch_size": batch, "limit_batches": steps, "device": "cuda", **train},
        "data": {"name": "fake", "image_size": size, "subset": {"train": batch * steps, "val": batch},
                 "num_workers": 4},
    })
    ctx = prepare(spec)
    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
    train_epoch(ctx, 0, flags)  # warm-up: cudnn autotuning, compilation
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = train_epoch(ctx, 1, flags)
    torch.cuda.synchronize()
    return result.seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="torchvision:resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (benchmarks/loops.py measures the CPU)")
        return 0
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backbone": args.backbone,
              "size": args.size, "batch": args.batch, "results": {}}
    base = None
    for name, train in SETTINGS:
        if train["precision"] == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        rate = measure(args.backbone, args.size, args.batch, args.steps, train)
        base = base or rate
        record["results"][name] = rate
        print(f"{name:<30} {rate:9.1f} img/s   x{rate / base:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
