"""What mixup/CutMix and random erasing cost in training images/s, against the same run without them.

    python benchmarks/augment_cost.py [--repeats 3] [--backbone torchvision:resnet18] [--size 64]

Each variant is a whole `surgery run` (digits, one epoch, every layer training, no other
augmentation) in a fresh process; the variants alternate and the median of the repeats is taken
from metrics.jsonl's `images_per_sec` (the training phase only). Prints a table with the ratio to
the plain run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "plain": [],
    "mixup/cutmix": ["--set", "train.mixup={}"],
    "erasing": ["--set", "data.augment={erasing: {prob: 0.25, mode: pixel}}"],
    "mixup/cutmix + erasing": ["--set", "train.mixup={}", "--set", "data.augment={erasing: {prob: 0.25, mode: pixel}}"],
}


def spec(backbone: str, size: int, batch: int) -> dict:
    return {
        "name": "augment-cost",
        "model": {"backbone": backbone, "num_classes": 10},
        "train": {"epochs": 1, "batch_size": batch, "optimizer": {"name": "adamw"}, "precision": "fp32"},
        "data": {"name": "digits", "image_size": size, "num_workers": 0},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="torchvision:resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="augment-cost-"))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec(args.backbone, args.size, args.batch)))
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        for name, extra in VARIANTS.items():  # alternate, so drift in the machine hits every variant alike
            out = work / f"{r}-{name.replace('/', '-').replace(' ', '')}"
            subprocess.run(
                [sys.executable, "-m", "surgery", "run", str(spec_path), "--out", str(out), *extra],
                check=True,
                capture_output=True,
            )
            row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            rates[name].append(row["images_per_sec"])
    base = statistics.median(rates["plain"])
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, digits, median of {args.repeats}:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:<24} {median:7.1f} img/s  x{median / base:.3f}   ({', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
