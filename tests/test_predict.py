"""`surgery predict` and `load_run`: real image files, the run's transforms, unreadable files, wrong run folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.cli import main
from surgery.deploy.predict import load_run
from surgery.runs import load_safetensors

SPEC = {
    "name": "tiny",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}
N_IMAGES = 5


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run(SPEC, "predict-tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of digits PNGs (one in a subfolder), a truncated PNG beside them, and a text file."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("images")
    digits = load_digits()
    (root / "digits" / "more").mkdir(parents=True)
    for i in range(N_IMAGES):
        folder = root / "digits" / ("more" if i == 0 else "")
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    (root / "digits" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 8)
    (root / "notes.txt").write_text("not an image")
    return root


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_predictions_for_a_folder_skip_unreadable_files(run_dir, images, capsys):
    code = main(
        [
            "predict",
            str(run_dir),
            str(images / "digits"),
            str(images / "notes.txt"),
            "--json",
            "--topk",
            "50",
            "--batch-size",
            "2",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    rows = _json_lines(out)
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == [f"{i}.png" for i in range(N_IMAGES)]
    classes = json.loads((run_dir / "classes.json").read_text())
    for row in rows:
        assert len(row["topk"]) == len(classes)  # --topk 50 clamped to the 10 classes
        probs = [p["prob"] for p in row["topk"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert probs == sorted(probs, reverse=True)
        assert {p["class"] for p in row["topk"]} == set(classes)
    assert "corrupt.png" in err and "notes.txt" in err and "skipped" in err


def test_table_output_names_each_image_and_its_classes(run_dir, images, capsys):
    image = images / "digits" / "1.png"
    assert main(["predict", str(run_dir), str(image), "--topk", "2"]) == 0
    out, err = capsys.readouterr()
    assert "1.png" in out and "prob" in out
    assert "model.safetensors" in err


def test_predictions_match_the_model_on_the_runs_eval_transform(run_dir, images):
    from surgery.deploy.predict import predict

    loaded = load_run(run_dir)
    path = images / "digits" / "2.png"
    [prediction] = list(predict(loaded, [path], topk=1))
    with Image.open(path) as image:
        x = loaded.preprocess(loaded.transform(image)[None])
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)[0]
    assert prediction.top[0] == (loaded.classes[int(probs.argmax())], pytest.approx(float(probs.max()), abs=1e-6))


def test_load_run_uses_the_runs_weights_never_the_original_source(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    spec = (copy / "spec.yaml").read_text()
    # a weight source that no longer exists, and options that would rename or re-initialise keys
    spec = spec.replace("pretrained: false", "pretrained: /nowhere/weights.pth")
    spec = spec.replace("reset_head: false", "reset_head: true")
    (copy / "spec.yaml").write_text(spec)
    loaded = load_run(copy)
    saved = load_safetensors(run_dir / "model.safetensors")
    state = loaded.model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert not loaded.model.training
    assert loaded.weights == copy / "model.safetensors" and loaded.note is None


def test_falls_back_to_the_best_checkpoint_and_says_so(run_dir, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(run_dir, copy)
    (copy / "model.safetensors").unlink()
    loaded = load_run(copy)
    assert loaded.weights == copy / "checkpoints" / "best.safetensors"
    assert "best.safetensors" in loaded.note


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: root / "missing", ["does not exist", "surgery run"]),
        (lambda root: root, ["spec.yaml"]),  # a folder, but not a run
    ],
)
def test_a_wrong_run_directory_is_a_clear_error(tmp_path, images, capsys, make, words):
    path = make(tmp_path)
    assert main(["predict", str(path), str(images / "digits")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert all(w in err for w in words)


def test_a_run_without_weights_says_how_to_finish_it(run_dir, tmp_path, images, capsys):
    copy = tmp_path / "started"
    copy.mkdir()
    shutil.copy(run_dir / "spec.yaml", copy / "spec.yaml")
    assert main(["predict", str(copy), str(images / "digits")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "--resume" in err


def test_nothing_readable_exits_nonzero_with_a_message(run_dir, images, tmp_path, capsys):
    assert main(["predict", str(run_dir), str(images / "digits" / "corrupt.png"), str(images / "notes.txt")]) == 1
    assert "nothing classified" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run_dir), str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err


ESCAPES = ["\x1b[2J", "\x1b]0;pwned\x07", "\x9b31m", "\u202eevil"]


def test_class_and_file_names_reach_the_terminal_escaped(run_dir, images, tmp_path, capsys, monkeypatch):
    """An old run's classes.json (written before datasets refused such names) and an image file name
    holding terminal escapes: shown as text (\\x1b), never sent raw to the terminal."""
    monkeypatch.setenv("COLUMNS", "400")
    copy = shutil.copytree(run_dir, tmp_path / "old")
    names = [f"c{i}{ESCAPES[i % len(ESCAPES)]}" for i in range(10)]
    (copy / "classes.json").write_text(json.dumps(names))
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(images / "digits" / "1.png", folder / "one\x1b[31m.png")
    shutil.copy(images / "digits" / "2.png", folder / "two.png")
    assert main(["predict", str(copy), str(folder), "--topk", "10"]) == 0
    out, err = capsys.readouterr()
    for text in (out, err):
        assert not any(ch in text for ch in "\x1b\x07\x9b\u202e"), repr(text)
    assert "one\\x1b[31m.png" in out and "\\x1b[2J" in out and "\\x1b]0;pwned\\x07" in out and "\\u202eevil" in out


def test_weights_of_another_model_are_refused_by_every_command_naming_what_differs(run_dir, tmp_path, images, capsys):
    from surgery.runs import save_safetensors

    copy = tmp_path / "foreign"
    shutil.copytree(run_dir, copy)
    state = load_safetensors(copy / "model.safetensors")
    width = state["fc.weight"].shape[1]
    state["fc.weight"], state["fc.bias"] = torch.zeros(3, width), torch.zeros(3)  # another head
    save_safetensors(copy / "model.safetensors", state)
    assert main(["predict", str(copy), str(images / "digits")]) == 2  # was: exit 0 with a random head
    assert "2 of another shape" in capsys.readouterr().err.replace("\n", "")
    del state["conv1.0.weight"]
    state["layer1.cbam_after.gate.weight"] = torch.zeros(4)  # a module this spec does not insert
    save_safetensors(copy / "model.safetensors", state)
    for command in (
        ["predict", str(copy), str(images / "digits")],
        ["evaluate", str(copy), "--split", "val"],
        ["export", str(copy)],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err.replace("\n", "")
        assert "model.safetensors does not hold the weights of the model its spec.yaml builds" in err, err
        assert "1 missing: conv1.0.weight" in err
        assert "1 unexpected: layer1.cbam_after.gate.weight" in err
        assert f"2 of another shape: fc.weight [3, {width}] in the file, [10, {width}] in the model" in err
        assert "Traceback" not in err
    assert not (copy / "export").exists() and not (copy / "eval").exists()


def test_without_device_a_run_is_loaded_on_its_recorded_device(run_dir, tmp_path):
    """The run's spec.yaml decides (as `surgery run` did), not a fixed cpu; --device still wins."""
    import yaml

    copy = tmp_path / "on-cuda9"
    shutil.copytree(run_dir, copy)
    saved = yaml.safe_load((copy / "spec.yaml").read_text())
    saved["train"]["device"] = "cuda:9"  # no machine running these tests has it
    (copy / "spec.yaml").write_text(yaml.safe_dump(saved))
    from surgery.errors import SpecError

    with pytest.raises(SpecError) as info:
        load_run(copy)
    assert "cuda" in str(info.value) and str(copy / "spec.yaml") in str(info.value)
    assert "train.device" in str(info.value)
    assert load_run(copy, "cpu").device == torch.device("cpu")
    assert load_run(run_dir).device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # train.device: auto
