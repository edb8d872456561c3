"""Where the time of one whole `surgery run` goes: cProfile's cumulative seconds of the phases
around training (training epochs, validation, build, checkpoints, the final files), in one
process. Shares within the process stay meaningful on a busy machine, where wall times do not.

    python benchmarks/run_profile.py [--epochs 3] [--batches 4] [--out /tmp/run-profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

from rich.console import Console

from surgery.spec import load_spec
from surgery.train import run

PHASES = [
    "prepare",
    "build",
    "data_for",
    "tune",
    "train_epoch",
    "evaluate",
    "_save_epoch",
    "save_torch",
    "save_safetensors",
    "_finish",
    "write_drawn_files",
    "plot_curves",
    "plot_confusion",
    "refresh_report",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/run-profile"))
    args = parser.parse_args()
    spec = load_spec(
        {
            "name": "profile",
            "model": {"backbone": "torchvision:resnet18", "num_classes": 10, "pretrained": False},
            "surgery": [{"insert": "cbam", "at": ["layer1", "layer2", "layer3", "layer4"], "init": "identity"}],
            "train": {
                "epochs": args.epochs,
                "batch_size": 64,
                "channels_last": False,
                "limit_batches": args.batches,
                "optimizer": {"name": "adam", "lr": 1e-3},
            },
            "data": {"name": "digits", "image_size": 64, "num_workers": 0},
        }
    )
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    run(spec, args.out, overwrite=True, console=Console(file=io.StringIO()))
    profile.disable()
    wall = time.perf_counter() - start
    print(f"wall {wall:.1f} s")
    rows = []
    for (file, line, name), (_, calls, _, cumulative, _) in pstats.Stats(profile).stats.items():
        if name in PHASES and "surgery" in file:
            rows.append((cumulative, calls, name, f"{Path(file).name}:{line}"))
    for cumulative, calls, name, where in sorted(rows, reverse=True):
        print(f"{cumulative:8.2f} s {cumulative / wall:6.1%} {calls:4d}x {name:<18} {where}")


if __name__ == "__main__":
    main()
