"""Every shipped spec runs: one short epoch on fake data of the spec's own size, through --set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [
    p
    for p in sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))
    if not p.name.startswith("sweep-")
]  # sweep files: tests/test_sweep.py


def _smoke(spec: Path) -> list[str]:
    # fake data shaped like the real thing (the spec's image size and class count), one batch of
    # two images, no pretrained download; everything else exactly as written
    return [
        "--set",
        "data.name=fake",
        "--set",
        "data.root=null",
        "--set",
        "data.augment=none",
        "--set",
        "data.classes=null",
        "--set",
        "data.subset={train: 4, val: 2}",
        "--set",
        "data.num_workers=0",
        "--set",
        "model.pretrained=false",
        "--set",
        "model.key_map=null",
        "--set",
        "model.reset_head=false",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.limit_batches=1",
    ]


@pytest.mark.parametrize("spec", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_runs_one_short_epoch(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), *_smoke(spec)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert (out / "model.safetensors").is_file()
