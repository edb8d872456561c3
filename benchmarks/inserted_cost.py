"""What the inserted modules themselves cost per training step: torchvision resnet18 with CBAM after
layer1..4 (as published; behind the identity gate, fused with torch.lerp as `Inserted` does now
and as the three operators x + g * (y - x) it used before), against the bare resnet18, at 64 px,
batch 64, forward + backward + Adam step on one fixed batch, fp32 on this machine's CPU.

The variants alternate inside one process (drift hits them alike) and the median of --repeats
rounds of --steps steps is reported; `--profile` adds torch.profiler's table of the CBAM model's
operators (self CPU time), which says where a step's time goes.

    python benchmarks/inserted_cost.py --repeats 5 --steps 5 --json benchmarks/results-cpu-inserted.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import types
from pathlib import Path

import torch
from torch import nn

from surgery import build, load_spec
from surgery.model import insert as insert_module


def model_for(variant: str, channels_last: bool) -> nn.Module:
    surgery = []
    if variant != "resnet18":
        init = "default" if variant == "cbam" else "identity"
        surgery = [{"insert": "cbam", "at": ["layer1", "layer2", "layer3", "layer4"], "init": init}]
    spec = load_spec(
        {
            "name": "cost",
            "model": {"backbone": "torchvision:resnet18", "num_classes": 10, "pretrained": False},
            "surgery": surgery,
            "data": {"name": "digits", "image_size": 64},
        }
    )
    torch.manual_seed(0)
    model = build(spec).model
    for module in model.modules():
        if isinstance(module, insert_module.Inserted) and module.gate is not None:
            module.gate.data.fill_(0.3)  # a gate trained away from 0
            if variant == "cbam-gate-3ops":  # the former formulation: three operators
                module.forward = types.MethodType(_three_ops, module)
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _three_ops(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = self.attn(x)
    return x + self.gate.to(x.dtype) * (y - x)


def stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    variants = ["resnet18", "cbam", "cbam-gate-lerp", "cbam-gate-3ops"]
    steps = {v: stepper(model_for(v, args.channels_last), x, y) for v in variants}
    for step in steps.values():  # warm-up: oneDNN primitives, optimizer state
        step()
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[v].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["resnet18"])
    record = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "settings": vars(args),
        "ms_per_step": {v: round(statistics.median(t) * 1000, 2) for v, t in times.items()},
        "all_ms_per_step": {v: [round(s * 1000, 2) for s in t] for v, t in times.items()},
        "overhead_vs_resnet18": {v: round(statistics.median(t) / base - 1, 4) for v, t in times.items()},
    }
    for v in variants:
        print(f"{v:<20} {record['ms_per_step'][v]:8.1f} ms/step  {record['overhead_vs_resnet18'][v]:+.1%}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                steps["cbam-gate-lerp"]()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)
        record["profile_top_ops"] = table
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
