"""The CUDA path, measured: fp32 NCHW, bf16 + channels_last, and bf16 + channels_last + compile.

    python benchmarks/gpu.py --json gpu.json                      # both models, every setting
    python benchmarks/gpu.py --timm-train .peer/train.py          # and timm's train.py beside it

For timm resnet50 and torchvision resnet18 + CBAM after layer1..4, at 224 px, `surgery`'s own
training step (prepare + train_epoch, no files written) runs on batches already on the GPU
(uint8, normalised on the device as in a real run), so the figures are the engine's and the
model's, not the data loader's. For each setting it reports images/s, peak GPU memory, the
fraction of the step spent waiting for data, and model FLOP utilisation: forward + backward
FLOPs per image (counted once with torch.utils.flop_counter) times images/s, over the GPU's
dense bf16 peak (--peak-tflops; 989 for an H200/H100 SXM by the datasheet, about 790 measured
on random data here, which is also reported).

With --timm-train, timm's own train.py (a fetched copy, never committed) and `surgery run` train
the same model at the same batch and precision on one generated ImageFolder (see
benchmarks/peer_timm.py), alternating, median of --repeats; the ratio is measured, not quoted.

Without a CUDA device it says so and exits 0: the CPU figures are benchmarks/loops.py's job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SETTINGS = [
    ("fp32 NCHW", {"precision": "fp32", "channels_last": False, "compile": False}),
    ("bf16 channels_last", {"precision": "bf16", "channels_last": True, "compile": False}),
    ("bf16 channels_last compile", {"precision": "bf16", "channels_last": True, "compile": True}),
]
MODELS = {
    "timm:resnet50": [],
    "torchvision:resnet18": [{"insert": "cbam", "at": "layer*", "init": "identity"}],
}


class DeviceBatches:
    """A stand-in for the run's loader: the same `steps` uint8 batches, generated once on the GPU."""

    def __init__(self, batch: int, size: int, steps: int, device: str) -> None:
        import torch

        g = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randint(0, 256, (batch, 3, size, size), generator=g, device=device, dtype=torch.uint8)
        self.y = torch.randint(0, 10, (batch,), generator=g, device=device)
        self.steps, self.batch_size = steps, batch

    def epoch(self, epoch: int, start: int = 0):
        return ((self.x, self.y) for _ in range(start, self.steps))

    def __len__(self) -> int:
        return self.steps


def flops_per_image(model, size: int, precision: str) -> float:
    """Forward + backward FLOPs of one image (batch of 8, divided), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, 3, size, size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    dtype = torch.bfloat16 if precision == "bf16" else None
    with counter, torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 8


def measure(backbone: str, size: int, batch: int, steps: int, train: dict, peak_tflops: float) -> dict:
    import torch

    from surgery import load_spec
    from surgery.train import apply_trainable, prepare, train_epoch

    spec = load_spec(
        {
            "name": "gpu-bench",
            "model": {"backbone": backbone, "num_classes": 10},
            "surgery": MODELS[backbone],
            "train": {"epochs": 2, "batch_size": batch, "device": "cuda", **train},
            "data": {"name": "fake", "image_size": size, "subset": {"train": batch, "val": batch}, "num_workers": 0},
        }
    )
    ctx = prepare(spec)
    ctx.train_loader = DeviceBatches(batch, size, steps, "cuda")
    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
    flops = flops_per_image(ctx.model, size, train["precision"])
    train_epoch(ctx, 0, flags)  # warm-up: cudnn autotuning, compilation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_epoch(ctx, 1, flags)
    torch.cuda.synchronize()
    rate = result.seen / (time.perf_counter() - start)
    return {
        "images_per_sec": rate,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "data_wait_fraction": result.data_seconds / max(result.seconds, 1e-9),
        "gflops_per_image": flops / 1e9,
        "mfu": flops * rate / (peak_tflops * 1e12),
    }


def matmul_tflops() -> float:
    """The bf16 matrix rate this GPU reaches on random data (8192^3, mean of 10 after 3 warm-ups)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--timm-train", type=Path, default=None, help="a copy of timm's train.py: run the peer")
    parser.add_argument("--peer-images", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (benchmarks/loops.py measures the CPU)")
        return 0
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "size": args.size,
        "batch": args.batch,
        "peak_tflops": args.peak_tflops,
        "measured_bf16_tflops": matmul_tflops(),
        "results": {},
        "peer": {},
    }
    print(
        f"{record['device']}: bf16 matmul {record['measured_bf16_tflops']:.0f} TFLOP/s measured, "
        f"MFU against {args.peak_tflops:.0f}",
        flush=True,
    )
    for backbone in args.models:
        base = None
        for name, train in SETTINGS:
            r = measure(backbone, args.size, args.batch, args.steps, train, args.peak_tflops)
            base = base or r["images_per_sec"]
            record["results"][f"{backbone} {name}"] = r
            print(
                f"{backbone:<22} {name:<28} {r['images_per_sec']:9.1f} img/s  x{r['images_per_sec'] / base:.2f}  "
                f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_memory_gib']:.1f} GiB  "
                f"data wait {100 * r['data_wait_fraction']:.1f}%",
                flush=True,
            )
    if args.timm_train is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from peer_timm import compare

        for model, precision in (("resnet50", "bf16"),):
            peer = compare(
                args.timm_train,
                device="cuda",
                model=model,
                size=args.size,
                batch=args.batch,
                images=args.peer_images,
                repeats=args.repeats,
                precision=precision,
                channels_last=True,
                workers=8,
            )
            record["peer"][f"{model} {precision} channels_last"] = peer
            m = peer["median"]
            print(
                f"peer {model} {precision}: timm train.py {m['timm train.py']:.1f} img/s, surgery run "
                f"{m['surgery run']:.1f} img/s, ratio {peer['ratio_surgery_over_timm']:.2f} "
                f"(median of {args.repeats})",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
