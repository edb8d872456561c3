"""The peer: timm's own `train.py` against `surgery run`, same model, data, batch, optimizer and
precision, no augmentation. Used by benchmarks/loops.py (CPU) and benchmarks/gpu.py (CUDA).

timm's train.py is not in the timm wheel: bring a copy of the file from its public repository
(huggingface/pytorch-image-models) at benchmark time, e.g. into the git-ignored `.peer/`, and pass
its path. It is never committed here.

    python benchmarks/peer_timm.py --timm-train .peer/train.py --device cpu --model resnet18 \
        --size 64 --batch 32 --images 960 --repeats 3 [--surgery-auto-layout]

Both run 2 epochs over one generated ImageFolder (digits, upscaled, written as PNG files under
train/ and validation/), and the figure taken is the second epoch's training throughput (the
first one warms up: allocator, cudnn autotuning, compilation):
- timm: the sum of its per-update `Time:` over epoch 1 (`--log-interval 1`, `--synchronize-step`),
  which spans data loading, forward, backward and the optimizer step of each update;
- surgery: `images_per_sec` of epoch 1 in metrics.jsonl, the same span (its training phase).
The two commands alternate and each is repeated; medians are reported with the ratio, of that
throughput and of each whole command's wall time (start-up, data, validation, checkpoints and the
final files included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_TRAIN_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?Time: ([0-9.]+)s,")


def make_imagefolder(root: Path, images: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """train/ and validation/ folders of digits PNGs (8x8 upscaled to `size`), class-balanced."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "done").exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("validation", max(images // 4, classes))):
        for i in range(n):
            label = i % classes
            pool = np.flatnonzero(digits.target == label)
            pixels = (digits.images[rng.choice(pool)] * (255 / 16)).astype("uint8")
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")
    (root / "done").write_text("ok")
    return root


def timm_command(
    train_py: Path,
    data: Path,
    out: Path,
    *,
    model: str,
    size: int,
    batch: int,
    device: str,
    precision: str,
    channels_last: bool,
    workers: int,
    compile: bool = False,
) -> list[str]:
    cmd = [
        sys.executable,
        str(train_py),
        "--data-dir",
        str(data),
        "--model",
        model,
        "--num-classes",
        "10",
        "--img-size",
        str(size),
        "-b",
        str(batch),
        "--epochs",
        "2",
        "--opt",
        "adamw",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0",
        "--sched",
        "step",
        "--decay-epochs",
        "100",
        "--warmup-epochs",
        "0",
        "--no-aug",
        "--smoothing",
        "0",
        "--log-interval",
        "1",
        "--synchronize-step",
        "-j",
        str(workers),
        "--device",
        device,
        "--output",
        str(out),
        "--checkpoint-hist",
        "1",
        "--seed",
        "0",
    ]
    if device != "cuda":
        cmd.append("--no-prefetcher")  # timm's prefetcher is CUDA-only
    if precision in ("bf16", "fp16"):
        cmd += ["--amp", "--amp-dtype", "bfloat16" if precision == "bf16" else "float16"]
    if channels_last:
        cmd.append("--channels-last")
    if compile:
        cmd.append("--torchcompile")
    return cmd


def run_timm(cmd: list[str], batch: int) -> tuple[float, float]:
    """(images per second of timm's second epoch, from its per-update log lines; the whole
    command's wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"timm train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds, updates = 0.0, 0
    for line in (proc.stdout + proc.stderr).splitlines():
        m = _TRAIN_LINE.search(line)
        if m and int(m.group(1)) == 1:
            seconds += float(m.group(4))
            updates += 1
    if not updates:
        raise RuntimeError("no 'Train: 1 [...]' lines in timm's output:\n" + proc.stderr[-2000:])
    return updates * batch / seconds, wall  # full batches only: --no-aug loader drops nothing, epochs are whole


def surgery_spec(
    data: Path,
    *,
    model: str,
    size: int,
    batch: int,
    device: str,
    precision: str,
    channels_last: bool | str,
    workers: int,
    compile: bool = False,
) -> dict:
    return {
        "name": "peer",
        "model": {"backbone": f"timm:{model}", "num_classes": 10},
        "train": {
            "epochs": 2,
            "batch_size": batch,
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0},
            "precision": precision,
            "channels_last": channels_last,
            "compile": compile,
            "device": device,
        },
        "data": {
            "name": "imagefolder",
            "root": str(data),
            "image_size": size,
            "augment": "none",
            "num_workers": workers,
        },
    }


def run_surgery(spec: dict, out: Path) -> tuple[float, float]:
    """(images per second of surgery's second epoch (metrics.jsonl); the whole command's wall seconds)."""
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "run", str(spec_path), "--out", str(out), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"surgery run failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(rows[1]["images_per_sec"]), wall


def compare(
    train_py: Path,
    *,
    device: str,
    model: str,
    size: int,
    batch: int,
    images: int,
    repeats: int,
    precision: str,
    channels_last: bool,
    workers: int,
    compile: bool = False,
    work: Path | None = None,
    auto_layout: bool = False,
) -> dict:
    """Alternate timm and surgery `repeats` times; medians and the ratio surgery / timm, of the
    training phase's throughput and of whole commands' wall time.

    Args:
        auto_layout: surgery runs with ``channels_last: auto`` (its default: the faster layout,
            the same numerics up to rounding) instead of timm's setting.
    """
    work = work or Path(tempfile.mkdtemp(prefix="peer-"))
    data = make_imagefolder(work / f"digits-{size}-{images}", images, size)
    settings = dict(
        model=model,
        size=size,
        batch=batch,
        device=device,
        precision=precision,
        channels_last=channels_last,
        workers=workers,
        compile=compile,
    )
    rates: dict[str, list[float]] = {"timm train.py": [], "surgery run": []}
    walls: dict[str, list[float]] = {"timm train.py": [], "surgery run": []}
    ours = {**settings, "channels_last": "auto"} if auto_layout else settings
    if auto_layout:  # one run first, untimed: its trial is cached for the timed ones, as for a user's second run
        run_surgery(surgery_spec(data, **ours), work / "surgery-first")
    for r in range(repeats):
        for name, (rate, wall) in (
            ("timm train.py", run_timm(timm_command(train_py, data, work / f"timm-{r}", **settings), batch)),
            ("surgery run", run_surgery(surgery_spec(data, **ours), work / f"surgery-{r}")),
        ):
            rates[name].append(rate)
            walls[name].append(wall)
        print(
            f"repeat {r + 1}/{repeats}: timm {rates['timm train.py'][-1]:.1f} img/s "
            f"{walls['timm train.py'][-1]:.1f} s, surgery {rates['surgery run'][-1]:.1f} img/s "
            f"{walls['surgery run'][-1]:.1f} s",
            flush=True,
        )
    medians = {k: statistics.median(v) for k, v in rates.items()}
    wall_medians = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "settings": settings,
        "images": images,
        "repeats": repeats,
        "rates": rates,
        "median": medians,
        "ratio_surgery_over_timm": medians["surgery run"] / medians["timm train.py"],
        "wall_seconds": walls,
        "median_wall_seconds": wall_medians,
        # > 1: surgery's whole command is shorter
        "wall_ratio_timm_over_surgery": wall_medians["timm train.py"] / wall_medians["surgery run"],
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", required=True, type=Path, help="a copy of timm's train.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--surgery-auto-layout",
        action="store_true",
        help="surgery with channels_last: auto (its default) instead of timm's layout setting",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.timm_train.is_file():
        print(f"no timm train.py at {args.timm_train}: copy it from huggingface/pytorch-image-models first")
        return 2
    record = compare(
        args.timm_train,
        device=args.device,
        model=args.model,
        size=args.size,
        batch=args.batch,
        images=args.images,
        repeats=args.repeats,
        precision=args.precision,
        channels_last=not args.no_channels_last,
        workers=args.workers,
        compile=args.compile,
        auto_layout=args.surgery_auto_layout,
    )
    m, w = record["median"], record["median_wall_seconds"]
    print(
        f"median over {args.repeats}: timm train.py {m['timm train.py']:.1f} img/s, surgery run "
        f"{m['surgery run']:.1f} img/s, ratio {record['ratio_surgery_over_timm']:.2f}; whole commands: timm "
        f"{w['timm train.py']:.1f} s, surgery {w['surgery run']:.1f} s, timm / surgery "
        f"{record['wall_ratio_timm_over_surgery']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
