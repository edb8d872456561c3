"""RUN_DIR/report.html: written at the end of a run, rewritten by `surgery report`, self-contained,
tolerant of missing and malformed files, escaped, and rendered by a real browser."""

from __future__ import annotations

import hashlib
import html as html_module
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from browser import assert_not_blank, keep_screenshot, page_text, render
from PIL import Image
from rich.console import Console
from runs import train_quietly

from surgery.cli import main
from surgery.pages.run_page import data_uri, gather, write_report
from surgery.runs import read_metrics
from surgery.spec import load_spec
from surgery.train.schedule import schedule_table

HOSTILE = "<script>alert(1)</script>"


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy to change, without the weights (the page reads none of them)."""
    return Path(shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors", "*.pt")))


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _self_contained(html: str) -> None:
    """Opens from disk without a server or network: no scripts, no external style, fonts or images."""
    _, tags = page_text(html)
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    assert "url(" not in html and "@import" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)


def _tables(html: str) -> list[list[list[str]]]:
    """Every table as rows of cell texts (header row first)."""
    tables = []
    for block in re.findall(r"<table.*?</table>", html, flags=re.S):
        rows = [
            [page_text(cell)[0] for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, flags=re.S)]
            for row in re.findall(r"<tr.*?</tr>", block, flags=re.S)
        ]
        tables.append(rows)
    return tables


def _table(html: str, first_header: str) -> list[list[str]]:
    return next(t for t in _tables(html) if t and t[0][0] == first_header)


# --------------------------------------------------------------------------- a finished run
def test_run_writes_a_self_contained_report(tiny_run: Path) -> None:
    html = (tiny_run / "report.html").read_text(encoding="utf-8")
    summary = json.loads((tiny_run / "summary.json").read_text())
    _self_contained(html)
    text, _ = page_text(html)
    assert "finished: 2 epochs" in text
    assert f"best val accuracy {summary['best_val_acc']:.4f} epoch {summary['best_epoch'] + 1}" in text.lower()
    assert f"final val accuracy {summary['final_val_acc']:.4f}" in text.lower()
    # per-class table: every class with its recall and F1 as summary.json has them
    rows = {r[0]: r[1:] for r in _table(html, "class")[1:]}
    assert list(rows) == json.loads((tiny_run / "classes.json").read_text())
    for name, cells in rows.items():
        assert cells[-2:] == [f"{summary['per_class_accuracy'][name]:.4f}", f"{summary['per_class_f1'][name]:.4f}"]
    # the epoch table: one row per epoch, with metrics.jsonl's losses
    epochs = _table(html, "epoch")
    metrics = read_metrics(tiny_run / "metrics.jsonl")
    assert [r[0] for r in epochs[1:]] == [str(m["epoch"] + 1) for m in metrics]
    assert [r[epochs[0].index("val loss")] for r in epochs[1:]] == [f"{m['val_loss']:.4f}" for m in metrics]
    # the load report and the inserted modules, as load_report.json has them
    report = json.loads((tiny_run / "load_report.json").read_text())
    counts = {r[0]: r[1] for r in _table(html, "tensors")[1:]}
    assert counts["new"] == str(len(report["new"])) and counts["random"] == str(len(report["random"]))
    assert [r[0] for r in _table(html, "inserted module")[1:]] == [m["path"] for m in report["inserted_modules"]]
    assert (tiny_run / "spec.yaml").read_text().splitlines()[0] in text
    assert html.count('src="data:image/png;base64,') == 2  # curves and confusion matrix


def test_write_report_is_idempotent_and_touches_nothing_else(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path)
    before = _files(run)
    first = write_report(run).read_bytes()
    assert write_report(run).read_bytes() == first
    after = _files(run)
    assert {k: v for k, v in after.items() if k != "report.html"} == {
        k: v for k, v in before.items() if k != "report.html"
    }
    assert not [p for p in run.rglob("*.tmp")]


def test_schedule_marks_frozen_groups_and_unfreeze_epochs(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path)
    spec_text = (run / "spec.yaml").read_text()
    # a later stage that the run never reached: the table shows the plan for epochs not trained yet
    spec = load_spec(
        run / "spec.yaml",
        [
            "train.epochs=4",
            "groups=[{name: new, params: ['@inserted', '@head'], "
            "lr: 0.01}, {name: body, params: ['*'], lr: 0.001, unfreeze_at: 2}]",
        ],
    )
    (run / "spec.yaml").write_text(spec.to_yaml())
    (run / "summary.json").unlink()
    html = write_report(run).read_text()
    table = _table(html, "epoch")
    assert table[0][:3] == ["epoch", "new", "body"]
    plan = schedule_table(spec)
    for row, planned in zip(table[1:], plan):
        for cell, group in zip(row[1:3], ("new", "body")):
            g = planned["groups"][group]
            assert cell == (f"{g['lr']:.3g}" if g["trainable"] else "frozen")
    assert len(table) == 1 + 4 and "body from epoch 3" in page_text(html)[0]
    assert re.search(r'class="num trainable starts">[^<]+</td>', html)  # body's first trainable epoch is marked
    assert spec_text != (run / "spec.yaml").read_text()


def test_unfinished_run_gets_a_page_from_metrics(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path)
    for name in ("summary.json", "report.html"):
        (run / name).unlink()
    shutil.rmtree(run / "plots")
    first = (run / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(first + "\n" + '{"epoch": 1, "train_lo')  # torn by a crash
    html = write_report(run).read_text()
    text, _ = page_text(html)
    row = json.loads(first)
    assert "unfinished: 1 of 2 epochs trained" in text
    assert f"last val accuracy {row['val_acc']:.4f} after epoch 1 of 2" in text.lower()
    assert html.count('src="data:image/png;base64,') == 1  # curves redrawn from metrics.jsonl; no confusion yet
    assert len(_table(html, "epoch")) == 1 + 2  # the epoch not trained yet shows the plan
    assert not (run / "plots").exists()  # the page draws into memory, never into the run


# --------------------------------------------------------------------------- evaluate and explain outputs
def _png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (40, 30), colour).save(path)


def _eval_and_explain(run: Path) -> dict:
    classes = json.loads((run / "classes.json").read_text())
    folder = run / "eval" / "test"
    folder.mkdir(parents=True)
    pngs = {
        "confusion": "confusion.png",
        "confusion_normalized": "confusion_normalized.png",
        "reliability": "reliability.png",
        "mistakes": "mistakes.png",
    }
    for i, name in enumerate(pngs.values()):
        _png(folder / name, (40 * i, 90, 200))
    metrics = {
        "split": "test",
        "source": "/data/digits-test",
        "images": 120,
        "weights": "model.safetensors",
        "accuracy": 0.8125,
        "top5": None,
        "per_class": {
            c: {"precision": 0.5 + i / 40, "recall": 0.6, "f1": 0.55, "support": 12} for i, c in enumerate(classes)
        },
        "macro_avg": {"precision": 0.61, "recall": 0.6, "f1": 0.55, "support": 120},
        "weighted_avg": {"precision": 0.62, "recall": 0.6, "f1": 0.56, "support": 120},
        "most_confused": [{"true": classes[3], "predicted": classes[5], "count": 4}],
        "ece": 0.0421,
        "tta": {"accuracy": 0.8333, "gain": 0.0208, "views": 2},
        "pngs": pngs,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (run / "eval" / "broken").mkdir()
    (run / "eval" / "broken" / "metrics.json").write_text('{"split": "broken", ')
    (run / "explain").mkdir()
    _png(run / "explain" / "0.png", (200, 30, 30))
    (run / "explain" / "predictions.json").write_text(
        json.dumps(
            [
                {
                    "image": "digits/7/a.png",
                    "png": "0.png",
                    "predicted": classes[7],
                    "confidence": 0.9312,
                    "explained_class": classes[7],
                    "layer": "layer4",
                    "method": "gradcam",
                    "modules": ["layer4.cbam_after"],
                },
                {"image": "b.png", "png": "missing.png", "predicted": classes[1]},
                {"image": "c.png", "png": "../summary.json", "predicted": classes[2]},
            ]
        )
    )
    return metrics


def test_evaluate_and_explain_outputs_are_shown(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path)
    metrics = _eval_and_explain(run)
    html = write_report(run).read_text()
    _self_contained(html)
    text, _ = page_text(html)
    assert (
        f"accuracy {metrics['accuracy']:.4f}" in text and f"with tta {metrics['tta']['accuracy']:.4f}" in text.lower()
    )
    assert "120 images from /data/digits-test" in text
    per_class = _table(html, "class")  # the run's table comes first; the evaluation's has precision
    evaluation = next(t for t in _tables(html) if t[0][:2] == ["class", "precision"])
    assert len(evaluation) == 1 + len(metrics["per_class"]) + 2  # the classes, macro and weighted averages
    assert evaluation[-2][:2] == ["macro average", f"{metrics['macro_avg']['precision']:.4f}"]
    assert _table(html, "true")[1] == [
        metrics["most_confused"][0]["true"],
        metrics["most_confused"][0]["predicted"],
        "4",
    ]
    assert html.count('src="data:image/png;base64,') == 2 + 4 + 1  # run plots, eval pictures, one explanation
    assert "predicted 7 (0.9312)" in text and "gradcam at layer4" in text
    problems = html_module.unescape(re.search(r'<div class="problems".*?</div>', html, flags=re.S).group(0))
    assert "eval/broken/metrics.json: is not valid JSON" in problems
    assert "explain/missing.png: is named but missing" in problems
    assert "'../summary.json' that is not a file name inside explain" in problems
    assert per_class


@pytest.mark.parametrize(
    "name, content, shown",
    [
        ("summary.json", "[1, 2]", "summary.json: holds a JSON list, not an object"),
        ("load_report.json", "{oops", "load_report.json: is not valid JSON"),
        ("classes.json", b"\xff\xfe", "classes.json: cannot be read"),
        ("spec.yaml", "model: {backbone: 3}\n", "spec.yaml: does not load as a spec"),
        ("summary.json", "[" * 100_000 + "]" * 100_000, "summary.json: is not valid JSON (nested too deeply)"),
        ("summary.json", b'{"name": "\xff"}', "summary.json: cannot be read (UnicodeDecodeError"),
        ("metrics.jsonl", b'{"epoch": 0}\n{"epoch": "\xff"}\n', "metrics.jsonl: cannot be read (UnicodeDecodeError"),
    ],
)
def test_malformed_files_are_named_on_the_page(tiny_run: Path, tmp_path: Path, name: str, content, shown: str) -> None:
    run = _copy(tiny_run, tmp_path)
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    data = gather(run)
    assert any(p.startswith(shown) for p in data["problems"]), data["problems"]
    html = write_report(run).read_text()
    assert shown.split(": ", 1)[1] in html


def test_only_files_inside_the_run_are_embedded(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path)
    _eval_and_explain(run)
    secret = tmp_path / "elsewhere.png"
    _png(secret, (1, 2, 3))
    confusion = run / "eval" / "test" / "confusion.png"
    confusion.unlink()
    confusion.symlink_to(secret)  # a picture named by metrics.json, linked out of the run
    (run / "plots" / "curves.png").unlink()
    (run / "plots" / "curves.png").symlink_to(secret)
    inner = run / "explain" / "0.png"
    moved = run / "explain" / "real.png"
    inner.rename(moved)
    inner.symlink_to(moved)  # a link that stays inside the run is fine
    data = gather(run)
    outside = [p for p in data["problems"] if "outside the run directory" in p]
    assert sorted(p.split(":")[0] for p in outside) == ["eval/test/confusion.png", "plots/curves.png"], data["problems"]
    html = write_report(run).read_text()
    assert data_uri(secret.read_bytes()) not in html
    assert len(data["explanations"]) == 1


WRONG = [
    b"",
    b"null",
    b"[]",
    b"\xff\xfe",
    b'[1, "a", null, {"png": 5}]',
    json.dumps(
        {
            "per_class": "x",
            "pngs": [1],
            "accuracy": "high",
            "most_confused": {"a": 1},
            "tta": 3,
            "params": [],
            "balance": 2,
            "confusion_matrix": [[1, 2], [3]],
            "best_epoch": "x",
            "epochs": None,
            "inserted_modules": [1, {"params": "x"}],
            "reinitialised": {"a": 1},
            "loaded": "str",
            "per_class_f1": {"0": "x"},
            "multi_label": "yes",
            "epoch": "x",
            "lr": 5,
        }
    ).encode(),
]


@pytest.mark.parametrize(
    "name",
    [
        "summary.json",
        "metrics.jsonl",
        "load_report.json",
        "classes.json",
        "spec.yaml",
        "eval/test/metrics.json",
        "explain/predictions.json",
    ],
)
def test_any_file_holding_anything_still_gives_a_page(tiny_run: Path, tmp_path: Path, name: str) -> None:
    """Empty, null, the wrong JSON type, not UTF-8, values of the wrong types: never a crash."""
    from surgery.pages.run_page import render_report

    run = _copy(tiny_run, tmp_path)
    _eval_and_explain(run)
    for content in WRONG:
        (run / name).write_bytes(content)
        data = gather(run)
        assert "</html>" in render_report(data) and data["name"]


# --------------------------------------------------------------------------- a multi-label run, escaping
CELLS = ["red", f"red | {HOSTILE}", "blue", f"blue|{HOSTILE}", "", "red|blue"]


@pytest.fixture(scope="module")
def multi_label_run(tmp_path_factory, one_thread) -> Path:
    """A real multi-label run whose class names include markup, with a head-only first epoch."""

    folder = tmp_path_factory.mktemp("multi")
    lines = ["path,label,split"]
    for i in range(18):
        cell = CELLS[i % len(CELLS)]
        colour = (220 if "red" in cell else 30, 120, 220 if "blue" in cell else 30 + i)
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        lines.append(f'{i}.png,"{cell}",{"train" if i < 12 else "val"}')
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    spec = load_spec(
        {
            "name": "multi",
            "model": {"backbone": "timm:resnet10t", "num_classes": 3, "pretrained": False},
            "groups": [
                {"name": "head", "params": ["@head"], "lr": 0.01},
                {"name": "body", "params": ["*"], "lr": 0.001, "unfreeze_at": 1},
            ],
            "train": {"epochs": 2, "batch_size": 6, "limit_batches": 2},
            "data": {
                "name": "csv",
                "root": str(folder / "labels.csv"),
                "multi_label": True,
                "image_size": 32,
                "num_workers": 0,
            },
        }
    )
    train_quietly(spec, folder / "run")
    return folder / "run"


def test_multi_label_report_escapes_class_names(multi_label_run: Path) -> None:
    html = (multi_label_run / "report.html").read_text(encoding="utf-8")
    summary = json.loads((multi_label_run / "summary.json").read_text())
    _self_contained(html)  # the class named <script> is text, not an element
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    text, _ = page_text(html)
    assert f"best val map {summary['best_val_map']:.4f}" in text.lower()
    assert "no confusion matrix" in text and html.count('src="data:image/png;base64,') == 1
    rows = {r[0]: r[1:] for r in _table(html, "class")[1:]}
    assert set(rows) == set(summary["per_class_f1"]) and HOSTILE in rows
    assert rows[HOSTILE][-1] == f"{summary['per_class_f1'][HOSTILE]:.4f}"
    epochs = _table(html, "epoch")
    assert epochs[0][:3] == ["epoch", "head", "body"] and epochs[1][2] == "frozen" and epochs[2][2] != "frozen"


# --------------------------------------------------------------------------- the command
def test_report_command(tiny_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(tiny_run, tmp_path)
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert f"wrote {run / 'report.html'}" in capsys.readouterr().err
    assert (run / "report.html").is_file()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "the run directory does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "the run path is not a folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "the folder is not a run directory: it has no spec.yaml"),
    ],
)
def test_report_command_refuses_what_is_not_a_run(tiny_run: Path, tmp_path: Path, capsys, setup, message: str) -> None:
    good = _copy(tiny_run, tmp_path, "good")
    before = _files(good)
    bad = setup(tmp_path)
    assert main(["report", str(good), str(bad)]) == 2  # every folder is checked before any page is written
    err = capsys.readouterr().err
    assert f"error {bad}: {message}" in err and "Traceback" not in err
    assert _files(good) == before


def test_a_report_that_fails_is_a_warning_not_a_lost_run(tmp_path: Path, monkeypatch, one_thread) -> None:
    import surgery.pages.run_page
    from surgery.train import run

    def broken(run_dir):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(surgery.pages.run_page, "write_report", broken)
    out = io.StringIO()
    spec = load_spec(
        {
            "name": "t",
            "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
            "train": {"epochs": 1, "batch_size": 8, "limit_batches": 1},
            "data": {"name": "digits", "image_size": 32, "num_workers": 0},
        }
    )
    run(spec, tmp_path / "t", console=Console(file=out, width=400))
    assert (
        "report.html was not written (RuntimeError: template exploded); write it with: surgery report" in out.getvalue()
    )
    assert (tmp_path / "t" / "summary.json").is_file() and not (tmp_path / "t" / "report.html").exists()


# --------------------------------------------------------------------------- a real browser
def test_report_renders_in_chromium(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path)
    metrics = _eval_and_explain(run)
    page = write_report(run)
    shown = render(page, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['best_val_acc']:.4f}" in shown.text and f"{metrics['accuracy']:.4f}" in shown.text
    for name in json.loads((run / "classes.json").read_text()):
        assert re.search(rf"\b{re.escape(name)} [0-9.]+ [0-9.]+", shown.text)  # a per-class row
    assert "Evaluation" in shown.text and "Explanations" in shown.text and "script" not in shown.tags
    assert_not_blank(shown.screenshot)
    keep_screenshot(shown.screenshot, "report.png")


def test_a_group_unfrozen_by_a_rule_is_marked_at_the_epoch_it_really_unfroze():
    """An event rule's epoch is only in the record (metrics.jsonl's unfreeze_at), not in the spec."""
    from surgery import load_spec
    from surgery.pages.run_page import epoch_table

    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
            "groups": [
                {"name": "head", "params": ["@head"], "unfreeze_at": 0},
                {"name": "body", "params": ["*"], "unfreeze_at": {"plateau": {"patience": 1}}},
            ],
            "train": {"epochs": 4},
            "data": {"name": "digits", "image_size": 32},
        }
    )
    rows = [
        {
            "epoch": e,
            "lr": {"head": 1e-3, "body": 1e-3 if e >= 2 else None},
            "trainable": {"head": True, "body": e >= 2},
            "train_loss": 1.0,
            "train_acc": 0.5,
            "val_loss": 1.0,
            "val_acc": 0.5,
            "unfreeze_at": {"head": 0, "body": 2 if e >= 1 else None},
        }
        for e in range(3)
    ]
    table = epoch_table(spec, rows, best_epoch=2)
    assert table["unfreeze"] == {2: ["body"]}
    marked = [(r["epoch"], cell["starts"]) for r in table["rows"] for cell in r["groups"][1:]]
    assert marked == [(0, False), (1, False), (2, True), (3, False)]
