"""Training throughput: `surgery run`'s loop against a plain hand-written loop, same model and data.

Each measurement runs in a fresh subprocess (so peak memory is that loop's own), the loops
alternate, and the median of the repeats is reported. Prints a table, the ratios, the machine
and versions, and writes a JSON record.

    python benchmarks/loops.py                       # every case
    python benchmarks/loops.py --case resnet18-cbam-32 --repeats 3 --steps 30
    python benchmarks/loops.py --json benchmarks/results.json

Cases:
    resnet18-cbam-32    torchvision resnet18 + CBAM after layer1..4, digits at 32 px, full fine-tune
    resnet18-cbam-128   the same at 128 px
    vgg16-cbam-64       torchvision vgg16 + CBAM after every MaxPool2d, 64 px, full fine-tune
    head-only-32        resnet18 + CBAM, only the classifier head trainable: uncached, and on cached
                        features of the frozen body (what `surgery run` does in such a stage)
    resnet18-cbam-64    resnet18 + CBAM after layer1..4, digits at 64 px, batch 64, full fine-tune,
                        the engine with its defaults (channels_last: auto, fp32): issue 21's case
The plain loop is the one tutorials write: Adam, fp32, no channels_last, a default DataLoader
over a Dataset applying ToTensor + Normalize, `loss.item()` and `.sum().item()` every step.
The strong plain loop ("plain-strong") is the careful one: every image resized and normalised
once into a TensorDataset, Adam, fp32, no channels_last, nothing read back per step.

    python benchmarks/loops.py --case none --timm-train .peer/train.py --json peer.json

adds the second peer, timm's own train.py against `surgery run`, whole commands on one generated
ImageFolder (benchmarks/peer_timm.py: timm resnet18, 64 px, batch 32, AdamW, fp32,
channels_last, no augmentation, 2 epochs, the second timed; alternating, median of --repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "resnet18-cbam-32": {"backbone": "torchvision:resnet18", "at": "layer*", "size": 32, "batch": 64, "stage": "full"},
    "resnet18-cbam-128": {
        "backbone": "torchvision:resnet18",
        "at": "layer*",
        "size": 128,
        "batch": 32,
        "stage": "full",
    },
    "vgg16-cbam-64": {
        "backbone": "torchvision:vgg16",
        "at": {"type": "MaxPool2d"},
        "size": 64,
        "batch": 16,
        "stage": "full",
    },
    "head-only-32": {"backbone": "torchvision:resnet18", "at": "layer*", "size": 32, "batch": 64, "stage": "head"},
    # issue 21's case: the engine with its defaults (channels_last: auto, precision: auto = fp32 here)
    "resnet18-cbam-64": {
        "backbone": "torchvision:resnet18",
        "at": "layer*",
        "size": 64,
        "batch": 64,
        "stage": "full",
        "defaults": True,
    },
}


def spec_dict(case: dict, steps: int) -> dict:
    if case["stage"] == "full":
        groups = [
            {"name": "new", "params": ["@inserted", "@head"], "lr": 1e-3},
            {"name": "body", "params": ["*"], "lr": 1e-4},
        ]
    else:  # only the classifier head trains: the stage where the body could be skipped entirely
        groups = [
            {"name": "head", "params": ["@head"], "lr": 1e-3},
            {"name": "body", "params": ["*"], "lr": 1e-4, "unfreeze_at": "never"},
        ]
    return {
        "name": "bench",
        "model": {"backbone": case["backbone"], "num_classes": 10},
        "surgery": [{"insert": "cbam", "at": case["at"], "init": "identity"}],
        "groups": groups,
        # bf16 autocast from 64 px up: on this Xeon (AVX512-BF16) it speeds these ResNet/VGG steps
        # up 1.4-1.7x (it slows EfficientNets, so it is the spec's choice, not `auto`'s)
        "train": {
            "epochs": 1,
            "batch_size": case["batch"],
            "limit_batches": steps,
            "optimizer": {"name": "adam"},
            **(
                {}
                if case.get("defaults")
                else {"channels_last": True, "precision": "bf16" if case["size"] >= 64 else "fp32"}
            ),
        },
        "data": {"name": "digits", "image_size": case["size"], "num_workers": 0},
    }


# --------------------------------------------------------------------------- the two loops (child side)
def run_engine(case: dict, steps: int, warmup: int, cached: bool = False) -> dict:
    from surgery import load_spec
    from surgery.train import apply_trainable, prepare, train_epoch, use_feature_cache

    spec = load_spec(spec_dict(case, steps))
    ctx = prepare(spec, device="cpu")
    flags = apply_trainable(ctx.model, ctx.built.groups, 0)
    ctx.trainable_params = [p for p in ctx.model.parameters() if p.requires_grad]
    extra = {}
    if cached:  # what `surgery run` does in a head-only stage: the body runs once, up front
        start = time.perf_counter()
        note = use_feature_cache(ctx, flags)
        extra = {"cache_seconds": time.perf_counter() - start, "cache_note": note}
        if ctx.features is None:
            raise SystemExit(f"no cache: {note}")
    spec_warm = load_spec(spec_dict(case, warmup))
    ctx_warm = ctx.__class__(**{**ctx.__dict__, "spec": spec_warm})
    train_epoch(ctx_warm, 0, flags)
    result = train_epoch(ctx, 1, flags)
    return {
        "images_per_sec": result.seen / result.seconds,
        "seen": result.seen,
        "seconds": result.seconds,
        "data_wait_fraction": result.data_seconds / result.seconds,
        **extra,
    }


def run_plain(case: dict, steps: int, warmup: int) -> dict:
    import torch
    from torch import nn
    from torchvision import transforms

    from surgery import build, load_spec
    from surgery.data import build_data

    spec = load_spec(spec_dict(case, steps))
    torch.manual_seed(0)
    model = build(spec).model  # the same surgered model, as a user would get it
    if case["stage"] == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    bundle = build_data(
        spec,
        {
            "input_size": (3, case["size"], case["size"]),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
        },
    )
    to_float = transforms.Compose(
        [
            transforms.ConvertImageDtype(torch.float32),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    class Plain(torch.utils.data.Dataset):  # ToTensor + Normalize per item, as tutorials do
        def __len__(self) -> int:
            return len(bundle.train)

        def __getitem__(self, i: int):
            x, y = bundle.train[i]
            return to_float(x), y

    loader = torch.utils.data.DataLoader(Plain(), batch_size=case["batch"], shuffle=True)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def epoch(n_steps: int) -> tuple[int, float]:
        seen, running_loss, correct = 0, 0.0, 0
        start = time.perf_counter()
        while True:
            for x, y in loader:
                out = model(x)
                loss = criterion(out, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running_loss += loss.item()
                correct += (out.argmax(1) == y).sum().item()
                seen += y.shape[0]
                n_steps -= 1
                if n_steps == 0:
                    return seen, time.perf_counter() - start

    epoch(warmup)
    seen, seconds = epoch(steps)
    return {"images_per_sec": seen / seconds, "seen": seen, "seconds": seconds}


def run_plain_strong(case: dict, steps: int, warmup: int) -> dict:
    """The careful plain loop: every image resized and normalised once up front into a
    TensorDataset, a DataLoader over it, Adam, fp32, no channels_last, no `.item()` per step."""
    import torch
    from torch import nn

    from surgery import build, load_spec
    from surgery.data import build_data
    from surgery.data.transforms import normalize

    spec = load_spec(spec_dict(case, steps))
    torch.manual_seed(0)
    model = build(spec).model
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    bundle = build_data(
        spec,
        {
            "input_size": (3, case["size"], case["size"]),
            "mean": mean,
            "std": std,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
        },
    )
    items = [bundle.train[i] for i in range(len(bundle.train))]
    images = normalize(torch.stack([x for x, _ in items]), mean, std)
    labels = torch.tensor([int(y) for _, y in items])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=case["batch"], shuffle=True, drop_last=True
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def epoch(n_steps: int) -> tuple[int, float]:
        seen, loss_sum, correct = 0, torch.zeros(()), torch.zeros((), dtype=torch.int64)
        start = time.perf_counter()
        while True:
            for x, y in loader:
                out = model(x)
                loss = nn.functional.cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (out.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                n_steps -= 1
                if n_steps == 0:
                    float(loss_sum), int(correct)  # read once, at the end
                    return seen, time.perf_counter() - start

    epoch(warmup)
    seen, seconds = epoch(steps)
    return {"images_per_sec": seen / seconds, "seen": seen, "seconds": seconds}


def child(loop: str, case_name: str, steps: int, warmup: int) -> None:
    case = CASES[case_name]
    if loop == "plain":
        result = run_plain(case, steps, warmup)
    elif loop == "plain-strong":
        result = run_plain_strong(case, steps, warmup)
    else:
        result = run_engine(case, steps, warmup, cached=loop == "engine-cached")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the harness (parent side)
def measure(loop: str, case: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--child", loop, "--case", case, "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(row for row in out.stdout.splitlines() if row.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def machine() -> dict:
    import timm
    import torch
    import torchvision

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case",
        action="append",
        choices=sorted(CASES) + ["none"],
        help="default: every case; none: only the timm peer",
    )
    parser.add_argument(
        "--timm-train",
        type=Path,
        default=None,
        help="a copy of timm's train.py: also compare whole commands against it",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the record here")
    parser.add_argument("--child", choices=["engine", "engine-cached", "plain", "plain-strong"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.case[0], args.steps, args.warmup)
        return
    record = {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "cases": {}}
    print(f"machine: {record['machine']}")
    for case in [c for c in (args.case or list(CASES)) if c != "none"]:
        loops = ("plain", "plain-strong", "engine") + (("engine-cached",) if CASES[case]["stage"] == "head" else ())
        runs: dict[str, list[dict]] = {loop: [] for loop in loops}
        for _ in range(args.repeats):
            for loop in loops:  # alternate, so drift in the machine hits every loop alike
                runs[loop].append(measure(loop, case, args.steps, args.warmup))
        summary = {}
        for loop, results in runs.items():
            summary[loop] = {
                "images_per_sec": statistics.median(r["images_per_sec"] for r in results),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
                "all_images_per_sec": [round(r["images_per_sec"], 1) for r in results],
            }
            if "data_wait_fraction" in results[0]:
                summary[loop]["data_wait_fraction"] = statistics.median(r["data_wait_fraction"] for r in results)
            if "cache_seconds" in results[0]:
                summary[loop]["cache_seconds"] = statistics.median(r["cache_seconds"] for r in results)
        summary["speedup"] = summary["engine"]["images_per_sec"] / summary["plain"]["images_per_sec"]
        summary["speedup_vs_strong"] = summary["engine"]["images_per_sec"] / summary["plain-strong"]["images_per_sec"]
        summary["memory_ratio"] = summary["engine"]["peak_rss_mb"] / summary["plain"]["peak_rss_mb"]
        record["cases"][case] = summary
        print(
            f"{case:<20} plain {summary['plain']['images_per_sec']:7.1f} img/s "
            f"{summary['plain']['peak_rss_mb']:6.0f} MB | "
            f"engine {summary['engine']['images_per_sec']:7.1f} img/s {summary['engine']['peak_rss_mb']:6.0f} MB | "
            f"speed x{summary['speedup']:.2f} (x{summary['speedup_vs_strong']:.2f} the strong loop, "
            f"{summary['plain-strong']['images_per_sec']:.1f} img/s)  memory x{summary['memory_ratio']:.2f}  "
            f"data wait {summary['engine']['data_wait_fraction']:.1%}",
            flush=True,
        )
        if "engine-cached" in summary:
            cached = summary["engine-cached"]
            summary["cached_vs_uncached"] = cached["images_per_sec"] / summary["engine"]["images_per_sec"]
            print(
                f"{'':<20} engine on cached features {cached['images_per_sec']:9.1f} img/s "
                f"(x{summary['cached_vs_uncached']:.1f} the uncached head-only epoch; the body ran once "
                f"in {cached['cache_seconds']:.1f}s)",
                flush=True,
            )
    if args.timm_train is not None:
        from peer_timm import compare

        peer = compare(
            args.timm_train,
            device="cpu",
            model="resnet18",
            size=64,
            batch=32,
            images=960,
            repeats=args.repeats,
            precision="fp32",
            channels_last=True,
            workers=0,
        )
        record["timm_train_py"] = peer
        m = peer["median"]
        print(
            f"{'timm train.py peer':<20} timm {m['timm train.py']:7.1f} img/s | surgery run {m['surgery run']:7.1f} "
            f"img/s | x{peer['ratio_surgery_over_timm']:.2f}; whole commands timm / surgery "
            f"x{peer['wall_ratio_timm_over_surgery']:.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
