"""data.multi_label: a CSV of label sets, multi-hot targets, BCE training, mAP and per-class F1,
`surgery predict` listing every label above the threshold, and the spec rules around it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from runs import train_quietly

from surgery.cli import main
from surgery.data import build_data, pos_weights
from surgery.errors import SpecError
from surgery.spec import load_spec
from surgery.train.multilabel import multi_label_metrics

# colour channels as classes: red, green, blue; an image holds the classes of its bright channels
CELLS = ["red", "green | blue", "red|green", "", "blue", "red | green | blue", "green", "red|blue"]


def _write(folder: Path, n_train: int = 16, n_val: int = 8) -> Path:
    lines = ["path,label,split"]
    for i in range(n_train + n_val):
        cell = CELLS[i % len(CELLS)]
        on = {c.strip() for c in cell.split("|") if c.strip()}
        colour = tuple(220 if c in on else 20 + 3 * i for c in ("red", "green", "blue"))
        (folder / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(folder / "img" / f"{i}.png")
        lines.append(f'img/{i}.png,"{cell}",{"train" if i < n_train else "val"}')
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


def _spec(csv: Path, **data) -> dict:
    return {
        "name": "multi",
        "seed": 0,
        "model": {"backbone": "timm:resnet10t", "num_classes": 3, "pretrained": False},
        "train": {"epochs": 2, "batch_size": 8, "limit_batches": 2, "label_smoothing": 0.1},
        "data": {"name": "csv", "root": str(csv), "multi_label": True, "image_size": 32, "num_workers": 0, **data},
    }


def test_label_sets_become_multi_hot_rows(tmp_path: Path) -> None:
    data = build_data(load_spec(_spec(_write(tmp_path))), {})
    assert data.classes == ["blue", "green", "red"]  # the union of all label names, sorted
    assert (len(data.train), len(data.val)) == (16, 8)
    _, target = data.train[1]  # "green | blue": spaces around the separator are dropped
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 1.0, 0.0]
    assert data.train[3][1].tolist() == [0.0, 0.0, 0.0]  # an empty cell: no class
    assert data.train.multi_hot.sum(0).tolist() == [8, 8, 8]


def test_another_separator(tmp_path: Path) -> None:
    for i in range(5):  # one file per row: the same image in train and val is refused
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{i}.png,cat ; dog\n" for i in range(5)))
    data = build_data(load_spec(_spec(tmp_path / "labels.csv", label_separator=";", val_split=0.4)), {})
    assert data.classes == ["cat", "dog"]


def test_metrics_are_scikit_learns() -> None:
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(0)
    probs = rng.random((20, 4))
    targets = (rng.random((20, 4)) > 0.5).astype(np.float32)
    targets[:, 3] = 0  # a class without positives is left out of the mean average precision
    m = multi_label_metrics(probs, targets, 0.4)
    assert m.ap_classes == 3
    assert m.mean_ap == pytest.approx(average_precision_score(targets[:, :3], probs[:, :3], average="macro"))
    assert m.f1 == pytest.approx(f1_score(targets, probs >= 0.4, average=None, zero_division=0).tolist())
    assert m.exact_match == pytest.approx(float(((probs >= 0.4) == (targets > 0.5)).all(1).mean()))
    # data.balance: loss -> BCE pos_weight = negatives / positives (1 for a class without positives)
    assert pos_weights(targets[:4]).tolist() == pytest.approx([(4 - n) / n if n else 1.0 for n in targets[:4].sum(0)])


def test_a_short_run_reports_map_and_f1_and_predict_lists_labels(tmp_path: Path, capsys, monkeypatch) -> None:
    from sklearn.metrics import average_precision_score, f1_score

    from surgery.deploy.predict import load_run

    csv = _write(tmp_path / "data")
    out = tmp_path / "run"
    summary = train_quietly(_spec(csv, balance="loss", threshold=0.3), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"val_map", "val_f1", "val_macro_f1"} <= set(r) for r in rows)
    assert rows[0]["train_acc_basis"] == "exact match"
    assert summary["multi_label"] and summary["balance"]["class_weights"] == {"blue": 1.0, "green": 1.0, "red": 1.0}
    best = max(rows, key=lambda r: r["val_map"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_map"] == best["val_map"]
    assert not (out / "plots" / "confusion.png").exists()
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["best"]["val_map"] == best["val_map"]
    # the final figures, recomputed with scikit-learn from the saved model's own predictions
    loaded = load_run(out)
    paths = [csv.parent / "img" / f"{i}.png" for i in range(16, 24)]
    images = torch.stack([loaded.transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = loaded.model(loaded.preprocess(images)).sigmoid().numpy()
    truth = np.array(
        [[c in {x.strip() for x in CELLS[i % 8].split("|")} for c in ("blue", "green", "red")] for i in range(16, 24)]
    )
    assert summary["final_val_map"] == pytest.approx(average_precision_score(truth, probs, average="macro"), abs=1e-5)
    f1 = f1_score(truth, probs >= 0.3, average=None, zero_division=0)
    assert list(summary["per_class_f1"].values()) == pytest.approx(f1.tolist(), abs=1e-6)
    # predict: every class at or above data.threshold, most probable first
    capsys.readouterr()
    assert main(["predict", str(out), *map(str, paths[:3]), "--json"]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for p, row in zip(predictions, probs[:3]):
        want = sorted((float(v) for v in row if v >= 0.3), reverse=True)
        assert [x["prob"] for x in p["labels"]] == pytest.approx(want, abs=1e-5)
    assert max(len(p["labels"]) for p in predictions) >= 2 or probs[:3].max() < 0.3
    monkeypatch.chdir(csv.parent)  # short paths: the table fits the 80 columns of a captured console
    assert main(["predict", str(out), "img/16.png", "img/17.png", "img/18.png"]) == 0
    table = capsys.readouterr().out
    for p in predictions:
        assert all(x["class"] in table for x in p["labels"])
    lines = [line for line in table.splitlines()[1:] if line.strip()]
    assert len(lines) == sum(max(len(p["labels"]), 1) for p in predictions)  # one line per label


MISTAKES = [
    # (data / train lines, key path of the error, words in the problem)
    ("data:\n  name: digits\n  multi_label: true   # <-\n", "data.multi_label", "CSV"),
    ("data:\n  name: csv\n  root: x.csv\n  multi_label: true\ntrain:\n  mixup: {}   # <-\n", "train.mixup", "mixup"),
    ("data:\n  name: csv\n  root: x.csv\n  multi_label: true\n  balance: sampler   # <-\n", "data.balance", "sampler"),
    ("data:\n  name: csv\n  root: x.csv\n  multi_label: true\n  classes: [a]   # <-\n", "data.classes", "classes"),
    ("data:\n  name: csv\n  root: x.csv\n  multi_label: true\n  threshold: 1.5   # <-\n", "data.threshold", ""),
]


@pytest.mark.parametrize("text,key,words", MISTAKES, ids=[m[1] for m in MISTAKES])
def test_spec_mistakes_are_located(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  backbone: timm:resnet10t\n" + text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    marked = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "# <-" in line)
    assert info.value.path == key and info.value.line == marked and info.value.file == str(path)
    assert words in info.value.problem


def test_validate_counts_the_csv_classes_against_num_classes(tmp_path: Path, capsys) -> None:
    csv = _write(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model:\n  backbone: timm:resnet10t\n  pretrained: false\n  num_classes: 4\n"
        f"data:\n  name: csv\n  root: {csv}\n  multi_label: true\n"
    )
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr()
    assert "num_classes: 3" in err.out + err.err


def test_a_head_only_stage_caches_multi_hot_targets(tmp_path: Path) -> None:
    from surgery.train import run

    spec = _spec(_write(tmp_path / "data"))
    spec["train"].update(epochs=1, cache_features="auto")
    spec["groups"] = [
        {"name": "head", "params": ["@head"], "lr": 1e-2},
        {"name": "body", "params": ["*"], "unfreeze_at": "never"},
    ]
    log = io.StringIO()
    summary = run(load_spec(spec), tmp_path / "run", console=Console(file=log, width=200))
    assert "the frozen body ran once" in log.getvalue()
    assert 0.0 <= summary["final_val_map"] <= 1.0 and len(summary["per_class_f1"]) == 3
