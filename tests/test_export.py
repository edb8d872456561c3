"""`surgery export`: each format reloads and computes what the trained, surgered model computes."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings

import pytest
import torch

from surgery.cli import main
from surgery.deploy.export import ExportFailed, export_run
from surgery.deploy.predict import load_run

# inserts both inside a leaf (MaxPool2d: its class is swapped at run time) and inside Sequentials
# (layer1..4), as in torchvision's resnet18 but smaller; init: default so that an export that
# dropped them would compute something else entirely
SPEC = {
    "name": "cut",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "surgery": [
        {"insert": "cbam", "at": {"type": "MaxPool2d"}, "init": "default"},
        {"insert": "se", "at": "layer*", "init": "default"},
    ],
    "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))
HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run(SPEC, "export-cut")


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)


def _reload(fmt: str, path):
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize(
    "fmt, out, expected",
    [
        ("pt2", "folder", "model.pt2"),  # --out FOLDER -> FOLDER/model.pt2
        ("torchscript", None, "model.ts"),  # default: RUN_DIR/export/
        pytest.param(
            "onnx",
            "file",
            "cut.onnx",
            marks=pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxscript are not installed"),
        ),
    ],
)
def test_export_matches_the_trained_model(run_dir, loaded, tmp_path, capsys, fmt, out, expected):
    args = {"folder": ["--out", str(tmp_path)], "file": ["--out", str(tmp_path / "cut.onnx")], None: []}[out]
    assert main(["export", str(run_dir), "--format", fmt, *args]) == 0
    folder = run_dir / "export" if out is None else tmp_path
    path = folder / expected
    assert "max abs diff" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [expected, expected + ".json"]
    sidecar = json.loads((folder / (expected + ".json")).read_text())
    assert sidecar["classes"] == json.loads((run_dir / "classes.json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 3, 32, 32] and len(sidecar["input"]["mean"]) == 3
    assert "normalised" in sidecar["input"]["description"]
    assert len(sidecar["inserted"]) == 5
    if fmt == "onnx" and not HAS_ONNXRUNTIME:  # checked by onnx.checker only, and it says so
        assert sidecar["check"]["max_abs_diff"] is None and "not compared" in " ".join(sidecar["notes"])
        return
    assert sidecar["check"]["max_abs_diff"] < 1e-4

    # independently: another batch size, compared with the surgered model itself
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = loaded.model(x)
        got = _reload(fmt, path)(x)
    assert (got - expected_logits).abs().max() < 1e-4


def test_a_missing_exporter_package_says_what_to_install(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import now raises ImportError
    assert main(["export", str(run_dir), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "onnxscript" in err and "Traceback" not in err


def test_an_export_that_does_not_match_is_not_written(loaded, tmp_path, monkeypatch):
    from surgery.deploy import export

    def fake_export(model, sample, path, notes):
        path.write_bytes(b"an export")
        return "fake", None

    def off_by_one(path):
        return lambda x: loaded.model(x) + 1

    monkeypatch.setitem(export.EXPORTERS, "pt2", (fake_export, off_by_one, "test"))
    with pytest.raises(ExportFailed, match="differ"):
        export_run(loaded, "pt2", tmp_path / "bad.pt2")
    assert list(tmp_path.iterdir()) == []


def test_export_takes_the_weights_predict_and_evaluate_take(run_dir, tmp_path, capsys):
    out = tmp_path / "best.pt2"
    assert main(["export", str(run_dir), "--weights", "best", "--out", str(out)]) == 0
    sidecar = json.loads((tmp_path / "best.pt2.json").read_text())
    assert sidecar["weights"] == str(run_dir / "checkpoints" / "best.safetensors")
    assert main(["export", str(run_dir), "--weights", "ema", "--out", str(tmp_path / "ema.pt2")]) == 2
    err = capsys.readouterr().err
    assert "no ema weights" in err and "train.ema" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt2", "best.pt2.json"]


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_a_full_disk_stops_the_export_cleanly_and_leaves_nothing(run_dir, tmp_path, monkeypatch, capsys, fmt):
    import errno
    import os

    from surgery import files

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a full disk raises

    monkeypatch.setattr(files, "write_raw", full)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    name = "model.pt2" if fmt == "pt2" else "model.ts"
    assert f"cannot write {out / name}: No space left on device" in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # no partial file, no temporary


def test_torchscript_scripts_a_model_with_inserts_inside_a_leaf(loaded, tmp_path):
    """cbam inside MaxPool2d swaps its class for one whose forward takes *args: torch.jit.script
    compiles its scriptable form instead, so nothing falls back to tracing; the run's model keeps its keys."""
    keys = list(loaded.model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result = export_run(loaded, "torchscript", tmp_path / "m.ts")
    assert result.method == "torch.jit.script" and not any("failed" in n for n in result.notes), result.notes
    assert list(loaded.model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (_reload("torchscript", tmp_path / "m.ts")(x) - loaded.model.eval()(x)).abs().max() < 1e-4
