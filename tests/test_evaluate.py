"""`surgery evaluate` and `data.test_split`: held-out figures that match scikit-learn on predictions
made here independently, TTA, folders of labelled images, and bad input that changes nothing."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import train_quietly
from sklearn.metrics import classification_report, confusion_matrix, top_k_accuracy_score

from surgery import load_spec
from surgery.cli import main
from surgery.data import build_data, eval_transform, normalize
from surgery.data.transforms import TTAViews
from surgery.deploy.predict import load_run
from surgery.errors import SpecError
from surgery.evaluate.command import calibration, folder_name
from surgery.evaluate.plots import mistakes_png

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_SPEC = {
    "name": "tiny-test-split",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "surgery": [{"insert": "cbam", "at": ["layer4"], "init": "identity"}],
    "train": {"epochs": 1, "batch_size": 16, "limit_batches": 3, "ema": 0.9},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0, "test_split": 0.1},
}


@pytest.fixture(scope="module")
def test_run(trained_run):
    """A finished run trained with data.test_split: 0.1 and an EMA of its weights."""
    out = trained_run(TEST_SPEC, "tiny-test-split")
    return out


def _copy(run_dir: Path, to: Path) -> Path:
    """A copy of a run to write into (without checkpoints/last.pt: evaluate never reads it)."""
    return Path(shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("last.pt")))


@pytest.fixture
def fresh(test_run, tmp_path):
    """A copy of the test-split run that a test may write into."""
    return _copy(test_run, tmp_path / "run")


@pytest.fixture(scope="module")
def evaluated(test_run, tmp_path_factory):
    """A copy of the test-split run after `surgery evaluate RUN --tta`: (run dir, stdout, stderr)."""
    from contextlib import redirect_stderr, redirect_stdout

    copy = _copy(test_run, tmp_path_factory.mktemp("evaluated") / "run")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["evaluate", str(copy), "--tta"]) == 0
    return copy, out.getvalue(), err.getvalue()


def _snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under `folder`, with size and time of each file (a folder's own time changes
    when a staging folder comes and goes inside it)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _independent_predictions(run_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset indices, true labels, softmax) of a split, made without `surgery.evaluate.command`: the split
    rebuilt by build_data, its items read through the training pipeline's own dataset."""
    loaded = load_run(run_dir)
    bundle = build_data(loaded.spec, loaded.data_config)
    dataset = getattr(bundle, split)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        logits = loaded.model(normalize(torch.stack(images), loaded.mean, loaded.std))
    return np.asarray(dataset.indices), np.asarray(labels), logits.softmax(1).double().numpy()


def _printed_rows(out: str) -> dict[str, list[float]]:
    """The per-class table as printed: name -> [precision, recall, f1, support]."""
    rows = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s*(\S+(?: avg)?)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+(\d+)\s*", line)
        if match:
            rows[match[1]] = [float(v) for v in match.groups()[1:]]
    return rows


# --------------------------------------------------------------------------- the figures
def test_test_split_figures_match_scikit_learn_on_independent_predictions(evaluated):
    fresh, out, err = evaluated
    metrics = json.loads((fresh / "eval" / "test" / "metrics.json").read_text())
    indices, y_true, probs = _independent_predictions(fresh, "test")
    y_pred = probs.argmax(1)
    classes = json.loads((fresh / "classes.json").read_text())
    expected = classification_report(
        y_true,
        y_pred,
        labels=np.union1d(y_true, y_pred),
        target_names=[classes[c] for c in np.union1d(y_true, y_pred)],
        output_dict=True,
        zero_division=0,
    )
    assert metrics["split"] == "test" and metrics["images"] == len(y_true) and not metrics["used_for_model_selection"]
    assert metrics["accuracy"] == pytest.approx(float((y_pred == y_true).mean()))
    assert metrics["top5"] == pytest.approx(top_k_accuracy_score(y_true, probs, k=5, labels=np.arange(10)))
    for name, row in metrics["per_class"].items():
        for key, theirs in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "f1-score"),
            ("support", "support"),
        ):
            assert row[key] == pytest.approx(expected[name][theirs]), (name, key)
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for key in ("precision", "recall", "f1", "support"):
            assert metrics[ours][key] == pytest.approx(expected[theirs]["f1-score" if key == "f1" else key])
    assert metrics["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(10)).tolist()
    # what was printed is the same figures, to 4 decimals
    printed = _printed_rows(out)
    for name in [*metrics["per_class"], "macro avg", "weighted avg"]:
        row = expected[name]
        assert printed[name] == pytest.approx(
            [row["precision"], row["recall"], row["f1-score"], row["support"]], abs=5e-5
        ), name
    assert f"accuracy {metrics['accuracy']:.4f}" in out
    # predictions.jsonl names the same images, disjoint from what trained and what chose the epoch
    lines = _lines(fresh / "eval" / "test" / "predictions.jsonl")
    assert [x["index"] for x in lines] == indices.tolist()
    assert [x["predicted"] for x in lines] == [classes[p] for p in y_pred]
    bundle = build_data(load_spec(fresh / "spec.yaml"), {})
    assert not set(indices) & (set(bundle.train.indices) | set(bundle.val.indices))
    assert "wrote" in err and "traceback" not in err.lower()
    # the run's page now shows the evaluation
    assert "refreshed" in err and 'id="evaluation"' in (fresh / "report.html").read_text()


def test_calibration_error_on_cases_with_a_known_answer():
    ones = np.ones(10)
    assert calibration(ones, ones.astype(bool))[0] == pytest.approx(0.0)  # sure and right
    assert calibration(ones * 0.9, np.zeros(10, bool))[0] == pytest.approx(0.9)  # sure and wrong
    eighty = np.array([True] * 8 + [False] * 2)
    assert calibration(ones * 0.8, eighty)[0] == pytest.approx(0.0)  # 80% sure, 80% right
    # two bins: 0.3 (all right: gap 0.7) and 1.0 (all wrong: gap 1.0), half of the images each
    ece, table = calibration(np.array([0.3, 0.3, 1.0, 1.0]), np.array([True, True, False, False]), bins=10)
    assert ece == pytest.approx(0.85)
    assert sum(b["count"] for b in table) == 4
    assert [b["count"] for b in table if b["count"]] == [2, 2]
    # bins are (lower, upper]: a confidence of exactly 1/10 falls in the first bin
    assert calibration(np.array([0.1]), np.array([True]), bins=10)[1][0]["count"] == 1


def test_tta_averages_the_softmax_of_the_image_and_its_mirror(evaluated):
    fresh, out, _ = evaluated
    metrics = json.loads((fresh / "eval" / "test" / "metrics.json").read_text())
    tta = metrics["tta"]
    assert tta["views"] == ["original", "hflip"] and tta["images_with_crops"] == 0  # 8 px digits: nothing to crop
    assert f"TTA (original, hflip): accuracy {tta['accuracy']:.4f}, {tta['gain']:+.4f} against no TTA" in out
    lines = _lines(fresh / "eval" / "test" / "predictions.jsonl")
    y_true = np.array([x["true"] for x in lines])
    tta_acc = float((np.array([x["tta_predicted"] for x in lines]) == y_true).mean())
    assert tta["accuracy"] == pytest.approx(tta_acc)
    assert tta["gain"] == pytest.approx(tta_acc - metrics["accuracy"])
    assert tta["fixed"] - tta["broken"] == round(tta["gain"] * metrics["images"])
    # the first image by hand: the mean of the two softmaxes
    loaded = load_run(fresh)
    bundle = build_data(loaded.spec, loaded.data_config)
    image, _ = bundle.test[0]
    with torch.no_grad():
        views = torch.stack([image, image.flip(-1)])
        mean = loaded.model(normalize(views, loaded.mean, loaded.std)).softmax(1).mean(0)
    assert lines[0]["tta_confidence"] == pytest.approx(float(mean.max()), abs=1e-6)
    assert lines[0]["tta_predicted"] == loaded.classes[int(mean.argmax())]


def test_tta_crops_the_corners_where_the_eval_transform_crops():
    config = {"crop_pct": 0.875, "interpolation": "bilinear"}
    rng = np.random.default_rng(0)
    large = Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    views, names = TTAViews(config, 32)(large)
    assert names == ["original", "hflip", "crop top-left", "crop top-right", "crop bottom-left", "crop bottom-right"]
    assert torch.equal(views[0], eval_transform(config, 32)(large))
    assert torch.equal(views[1], views[0].flip(-1))
    # the corners of the image resized to 32 / 0.875 = 36 px on its shorter side
    from torchvision.transforms.functional import pil_to_tensor, resize

    resized = pil_to_tensor(resize(large, 36))
    assert torch.equal(views[2], resized[:, :32, :32]) and torch.equal(views[5], resized[:, -32:, -32:])
    small, names = TTAViews(config, 32)(Image.new("L", (8, 8)))  # resized whole: nothing to crop
    assert names == ["original", "hflip"] and small.shape == (2, 3, 32, 32)


def test_the_gallery_draws_gray_images_in_gray():
    gray = torch.arange(32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(1, 32, 32)
    mistake = {"true": "3", "predicted": "8", "confidence": 0.9}
    for image in (gray, gray.expand(3, -1, -1)):  # one channel, and a gray image read as RGB
        png = np.asarray(Image.open(io.BytesIO(mistakes_png([(image, mistake)], "t", 1))).convert("RGB")).astype(int)
        assert np.abs(png[..., 0] - png[..., 1]).max() <= 1 and np.abs(png[..., 1] - png[..., 2]).max() <= 1


def test_every_png_is_written_and_readable(evaluated):
    fresh, _, _ = evaluated
    metrics = json.loads((fresh / "eval" / "test" / "metrics.json").read_text())
    assert set(metrics["pngs"]) == {"confusion", "confusion_normalized", "reliability", "mistakes"}
    for name in metrics["pngs"].values():
        with Image.open(fresh / "eval" / "test" / name) as image:
            assert image.size[0] > 300 and image.size[1] > 150
    assert len(metrics["mistakes"]) == min(16, metrics["images"] - round(metrics["accuracy"] * metrics["images"]))
    confidences = [m["confidence"] for m in metrics["mistakes"]]
    assert confidences == sorted(confidences, reverse=True)
    pairs = metrics["most_confused"]
    assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    assert all(p["true"] != p["predicted"] for p in pairs)


# --------------------------------------------------------------------------- weights
def test_weights_choose_the_file_and_ema_needs_a_run_that_kept_one(evaluated, tiny_run, capsys):
    from surgery.deploy.predict import locate_run
    from surgery.runs import load_safetensors

    fresh = evaluated[0]
    for choice, file in (
        ("final", "model.safetensors"),
        ("best", "checkpoints/best.safetensors"),
        ("ema", "model_ema.safetensors"),
    ):
        assert locate_run(fresh, choice) == (fresh / file, None)
    metrics = json.loads((fresh / "eval" / "test" / "metrics.json").read_text())
    assert (metrics["weights"], metrics["weights_file"]) == ("final", "model.safetensors")
    ema = load_run(fresh, weights="ema")
    saved = load_safetensors(fresh / "model_ema.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in ema.model.state_dict().items())
    assert main(["evaluate", str(tiny_run), "--split", "val", "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert "no ema weights" in err and "train.ema" in err
    assert main(["predict", str(fresh), str(fresh / "plots" / "curves.png"), "--weights", "best"]) == 0
    assert "best.safetensors" in capsys.readouterr().err


# --------------------------------------------------------------------------- folders of labelled images
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """digits as PNGs in <class>/ folders: classes 3 and 7 only, 6 images each."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("labelled") / "my digits"
    digits = load_digits()
    for label in (3, 7):
        (root / str(label)).mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(digits.target == label)[-6:]):
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{n}.png")
    return root


def test_a_folder_is_matched_by_class_name_and_scored_like_the_split(fresh, labelled, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    (data / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short" * 4)
    assert main(["evaluate", str(fresh), "--data", str(data), "--json"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    name = folder_name(data)
    assert re.fullmatch(r"folder-data-[0-9a-f]{8}", name) and metrics["split"] == name
    assert (fresh / "eval" / name / "metrics.json").is_file()
    assert "broken.png" in err and [s["path"].endswith("broken.png") for s in metrics["skipped"]] == [True]
    # the same images through `predict`, which shares nothing with evaluate but load_run
    from surgery.deploy.predict import predict

    loaded = load_run(fresh)
    paths = sorted(p for p in data.rglob("*.png") if p.name != "broken.png")
    y_pred = [loaded.classes.index(p.top[0][0]) for p in predict(loaded, paths)]
    y_true = [int(p.parent.name) for p in paths]
    lines = _lines(fresh / "eval" / name / "predictions.jsonl")
    assert sorted((x["path"], x["predicted"]) for x in lines) == sorted((str(p), str(c)) for p, c in zip(paths, y_pred))
    expected = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for label, row in metrics["per_class"].items():
        assert [row["precision"], row["recall"], row["f1"], row["support"]] == pytest.approx(
            [expected[label][k] for k in ("precision", "recall", "f1-score", "support")]
        )
    assert metrics["macro_avg"]["f1"] == pytest.approx(expected["macro avg"]["f1-score"])
    assert metrics["images"] == 12 and metrics["source_kind"] == "folder"


def test_a_folder_of_a_relative_image_folder_run_with_its_own_test_images(labelled, tmp_path, capsys):
    """An image folder with train/ val/ test/, data.root relative to the spec: evaluate finds the
    folder through splits.json (spec.yaml keeps the relative path) and names images by path."""
    root = tmp_path / "project" / "imgs"
    for split in ("train", "val", "test"):
        shutil.copytree(labelled, root / split)
    spec_file = tmp_path / "project" / "spec.yaml"
    spec_file.write_text(
        "name: folder-run\nmodel: {backbone: 'timm:resnet10t', num_classes: 2, pretrained: false}\n"
        "train: {epochs: 1, batch_size: 6, limit_batches: 1}\n"
        "data: {name: imagefolder, root: imgs, image_size: 32, num_workers: 0}\n"
    )
    out = tmp_path / "runs" / "folder-run"
    train_quietly(spec_file, out)
    assert main(["evaluate", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 12 and "own test images" in metrics["source"]
    lines = _lines(out / "eval" / "test" / "predictions.jsonl")
    assert all(x["path"].startswith(str(root / "test")) for x in lines)
    # a test_split on a dataset with test images of its own is a located mistake
    with pytest.raises(SpecError) as caught:
        build_data(load_spec(spec_file, ["data.test_split=0.2"]), {})
    assert caught.value.path == "data.test_split" and "own" in caught.value.problem


# --------------------------------------------------------------------------- bad input changes nothing
def _no_weights(run_dir: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors", "checkpoints/best.safetensors"):
        (run_dir / name).unlink()


def _unknown_class(tmp: Path) -> list[str]:
    (tmp / "data" / "train" / "3").mkdir(parents=True)
    (tmp / "data" / "cat").mkdir()
    return ["--data", str(tmp / "data")]


def _no_images(tmp: Path) -> list[str]:
    (tmp / "empty" / "3").mkdir(parents=True)
    return ["--data", str(tmp / "empty")]


def _unreadable_only(tmp: Path) -> list[str]:
    (tmp / "bad" / "3").mkdir(parents=True)
    (tmp / "bad" / "3" / "x.png").write_bytes(b"not a png")
    return ["--data", str(tmp / "bad")]


def _multi_label(run_dir: Path) -> None:
    spec = run_dir / "spec.yaml"
    spec.write_text(
        spec.read_text().replace("name: digits", "name: csv").replace("multi_label: false", "multi_label: true")
    )


ERRORS = [  # (id, prepare the run copy, arguments after RUN_DIR, exit code, words of the message)
    ("no-weights", _no_weights, lambda t: [], 2, ["no trained weights"]),
    ("no-test-split", None, lambda t: [], 2, ["no test split", "data.test_split", "--data"]),
    ("missing-folder", None, lambda t: ["--data", str(t / "nowhere")], 2, ["no such folder", "--data"]),
    ("unknown-class", None, _unknown_class, 2, ["'cat'", "'train'", "point --data at"]),
    ("no-images", None, _no_images, 2, ["hold no images"]),
    ("nothing-readable", None, _unreadable_only, 1, ["no image could be read"]),
    ("batch-size", None, lambda t: ["--batch-size", "0"], 2, ["--batch-size"]),
    ("multi-label", _multi_label, lambda t: [], 2, ["multi-label", "summary.json"]),
    ("split-and-data", None, lambda t: ["--split", "val", "--data", str(t)], 2, ["not allowed with"]),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_is_one_clear_error_and_changes_nothing(case, test_run, tiny_run, tmp_path, capsys):
    name, prepare, args, code, words = case
    base = tiny_run if name == "no-test-split" else test_run
    copy = _copy(base, tmp_path / "run")
    if prepare:
        prepare(copy)
    before = _snapshot(copy)
    if name == "split-and-data":  # argparse's own check: its usage line and exit 2
        with pytest.raises(SystemExit) as caught:
            main(["evaluate", str(copy), *args(tmp_path)])
        assert caught.value.code == code
    else:
        assert main(["evaluate", str(copy), *args(tmp_path)]) == code
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert _snapshot(copy) == before


def test_a_failure_while_writing_keeps_the_previous_results(tmp_path, monkeypatch):
    import surgery.files as rundir  # the file layer every writer goes through
    from surgery.evaluate.command import write_folder

    folder = tmp_path / "run" / "eval" / "test"
    write_folder(folder, {"metrics.json": b"old", "predictions.jsonl": b"old", "confusion.png": b"old"})
    before = _snapshot(tmp_path / "run")
    real, calls = rundir.atomic_write_bytes, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise rundir.RunDirError(f"cannot write {path}: No space left on device")
        real(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", failing)
    with pytest.raises(rundir.RunDirError, match="No space left"):
        write_folder(folder, {"metrics.json": b"new", "predictions.jsonl": b"new", "confusion.png": b"new"})
    assert _snapshot(tmp_path / "run") == before  # the old results whole, no staging folder or lock left
    # a first evaluation that fails leaves no empty eval/ behind
    calls.clear()
    with pytest.raises(rundir.RunDirError):
        write_folder(tmp_path / "other" / "eval" / "val", {"a": b"", "b": b"", "c": b""})
    assert list((tmp_path / "other").iterdir()) == []
    # written whole, the folder is as readable as any other
    monkeypatch.setattr(rundir, "atomic_write_bytes", real)
    write_folder(folder, {"metrics.json": b"new"})
    assert (folder / "metrics.json").read_bytes() == b"new" and not (folder / "confusion.png").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_a_changed_dataset_is_refused(fresh, capsys):
    record = json.loads((fresh / "splits.json").read_text())
    record["test"]["fingerprint"] = "0" * 64
    (fresh / "splits.json").write_text(json.dumps(record))
    assert main(["evaluate", str(fresh)]) == 1
    assert "dataset changed" in capsys.readouterr().err
    assert not (fresh / "eval").exists()


# --------------------------------------------------------------------------- runs made before test_split
def test_a_run_from_before_test_split_evaluates_its_labelled_validation_split(tiny_run, tmp_path, capsys):
    old = _copy(tiny_run, tmp_path / "old")
    (old / "splits.json").unlink()
    spec = old / "spec.yaml"
    spec.write_text("".join(line for line in spec.read_text().splitlines(keepends=True) if "test_split" not in line))
    assert main(["evaluate", str(old), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "validation split" in out and "selected the model" in out
    metrics = json.loads((old / "eval" / "val" / "metrics.json").read_text())
    assert metrics["used_for_model_selection"] and metrics["images"] == 360


def test_a_checkpoint_from_before_test_split_still_resumes(tmp_path):
    from surgery.train.checkpoint import check_resumable

    spec = load_spec(TEST_SPEC | {"data": {"name": "digits"}})
    older = json.loads(json.dumps(spec.raw))
    del older["data"]["test_split"]
    assert check_resumable({"spec": older}, spec, tmp_path / "last.pt", tmp_path, 1) is None
    older["data"]["val_split"] = 0.3  # a real difference is still refused
    with pytest.raises(Exception, match="data.val_split"):
        check_resumable({"spec": older}, spec, tmp_path / "last.pt", tmp_path, 1)


# --------------------------------------------------------------------------- the split itself
@pytest.mark.parametrize("classes", [None, [5, 6, 7, 8, 9]])
def test_the_test_split_is_stratified_and_leaves_the_validation_split_alone(classes):
    def bundle(test_split):
        return build_data(
            load_spec(
                {
                    "model": {"backbone": "timm:resnet10t"},
                    "data": {"name": "digits", "test_split": test_split, "classes": classes},
                }
            ),
            {},
        )

    without, with_test = bundle(0), bundle(0.1)
    assert with_test.val.indices.tolist() == without.val.indices.tolist()
    train, test = set(with_test.train.indices), set(with_test.test.indices)
    assert not train & test and train | test == set(without.train.indices)
    counts = np.bincount(with_test.test.targets)
    assert counts.max() - counts.min() <= 1  # digits' classes are nearly equal: so is each one's share
    assert with_test.test.indices.tolist() == bundle(0.1).test.indices.tolist()  # seeded


def test_a_test_split_that_leaves_nothing_to_train_on_is_a_located_error():
    with pytest.raises(SpecError) as caught:
        build_data(
            load_spec(
                {
                    "model": {"backbone": "timm:resnet10t"},
                    "data": {"name": "fake", "test_split": 0.999, "subset": {"train": 8}},
                }
            ),
            {},
        )
    assert caught.value.path == "data.test_split"


def test_class_names_of_an_old_run_reach_the_terminal_escaped(fresh, labelled, capsys, monkeypatch):
    """classes.json written before datasets refused control characters: the per-class table shows
    them as text (the folder's classes 3 and 7 keep their names, so --data matches them)."""
    monkeypatch.setenv("COLUMNS", "300")
    names = [str(i) if i in (3, 7) else f"c{i}\x1b[{i}A" for i in range(10)]
    (fresh / "classes.json").write_text(json.dumps(names))
    assert main(["evaluate", str(fresh), "--data", str(labelled)]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err, repr(out + err)
    assert re.search(r"-> c\d\\x1b\[\dA", out), out  # a predicted class, shown as text
