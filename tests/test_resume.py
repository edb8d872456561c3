"""Resume and interruption: Ctrl-C mid-epoch, SIGKILL between epochs, failed writes, unwritable folders.

The resumed runs must end bit-identical to an uninterrupted one (CPU): same weights, optimizer
state and EMA, and a metrics.jsonl with every epoch exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from surgery import files as rundir  # the file layer every writer goes through
from surgery.cli import main
from surgery.errors import RunDirError
from surgery.runs import load_safetensors, read_metrics, save_torch

SPEC = {
    "name": "resume",
    # every source of state a resume must restore: dropout (global RNG), random augmentation,
    # momentum, EMA, a per-step cosine schedule with warm-up, a group unfreezing mid-run
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False, "args": {"drop_rate": 0.2}},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "limit_batches": 3,
        "channels_last": False,
        "ema": 0.9,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "scheduler": {"name": "cosine", "warmup_epochs": 1, "per_step": True},
    },
    "data": {"name": "digits", "image_size": 32, "num_workers": 0, "augment": "standard"},
    "groups": [
        {"name": "head", "params": ["@head"], "lr": 0.01},
        {"name": "body", "params": ["*"], "lr": 0.005, "unfreeze_at": 1},
    ],
}
TIMING = ("images_per_sec", "seconds", "data_wait_fraction")

# Runs `surgery run ARGS` in a child process that is interrupted at a chosen point, by a real signal.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import surgery.files
    import surgery.train.runner as train  # run() and the prepare() it calls
    from surgery.cli import main

    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "sigint":  # Ctrl-C during epoch 1, batch 1 (0-based): mid-epoch
        real_run = train.run
        def run(*a, **k):
            def hook(epoch, step, loss):
                if (epoch, step) == (1, 1):
                    os.kill(os.getpid(), signal.SIGINT)
            return real_run(*a, on_step=hook, **k)
        train.run = run
    elif mode == "sigkill":  # killed the moment epoch 0's checkpoint is on disk
        real_save = train.save_torch
        def save_torch(path, obj):
            real_save(path, obj)
            os.kill(os.getpid(), signal.SIGKILL)
        train.save_torch = save_torch
    sys.exit(main(args))
""")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "resume.yaml"
    path.write_text(json.dumps(SPEC))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def uninterrupted(spec_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", str(spec_path), "--out", str(out)]) == 0
    return out


def _child(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, str(script), mode, "run", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _assert_same_run(run: Path, reference: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors", "checkpoints/best.safetensors"):
        a, b = load_safetensors(run / name), load_safetensors(reference / name)
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(reference / "checkpoints" / "last.pt", weights_only=False)
    for part in ("model", "ema"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    for pid, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][pid][k]) for k, v in state.items() if torch.is_tensor(v))
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]
    expected = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(reference / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]  # every epoch exactly once
    assert rows == expected


def test_ctrl_c_mid_epoch_checkpoints_and_resume_matches_an_uninterrupted_run(spec_path, uninterrupted, tmp_path):
    out = tmp_path / "run"
    child = _child(tmp_path, "sigint", str(spec_path), "--out", str(out))
    assert child.returncode == 1, child.stdout + child.stderr
    assert "Traceback" not in child.stdout + child.stderr
    assert "interrupted in epoch 2/2 after batch 2 of 3" in child.stdout
    assert f"--out {out} --resume" in child.stdout  # says how to resume
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert (state["epoch"], state["batch"]) == (1, 2)  # mid-epoch, with this epoch's partial sums
    assert state["ranks"][0]["partial"]["seen"] == 32
    assert main(["run", str(spec_path), "--out", str(out), "--resume"]) == 0
    _assert_same_run(out, uninterrupted)


# the same run with the batch-level augmentations on the device: random erasing and mixup/CutMix
MIXED = json.loads(json.dumps(SPEC))
MIXED["train"]["mixup"] = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5}
MIXED["data"]["augment"] = {"hflip": 0.5, "crop": True, "erasing": {"prob": 0.5, "mode": "pixel"}}


def test_ctrl_c_mid_epoch_with_mixup_and_erasing_resumes_exactly(tmp_path):
    spec_path = tmp_path / "mixed.yaml"
    spec_path.write_text(json.dumps(MIXED))
    reference = tmp_path / "reference"
    assert main(["run", str(spec_path), "--out", str(reference)]) == 0
    out = tmp_path / "run"
    child = _child(tmp_path, "sigint", str(spec_path), "--out", str(out))
    assert child.returncode == 1, child.stdout + child.stderr
    assert "interrupted in epoch 2/2 after batch 2 of 3" in child.stdout
    assert main(["run", str(spec_path), "--out", str(out), "--resume"]) == 0
    _assert_same_run(out, reference)
    assert [r["train_acc_basis"] for r in read_metrics(out / "metrics.jsonl")] == ["dominant label"] * 2


def test_sigkill_between_epochs_then_resume_matches_an_uninterrupted_run(spec_path, uninterrupted, tmp_path):
    out = tmp_path / "run"
    child = _child(tmp_path, "sigkill", str(spec_path), "--out", str(out))
    assert child.returncode == -9, child.stdout + child.stderr
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0]
    assert main(["run", str(spec_path), "--out", str(out), "--resume"]) == 0
    _assert_same_run(out, uninterrupted)


def test_a_resumed_epoch_skips_done_batches_without_loading_them():
    from surgery import load_spec
    from surgery.data import build_data, make_loader

    spec = load_spec(SPEC)
    data = build_data(spec, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    loader = make_loader(
        data.train, batch_size=16, train=True, seed=spec.seed, num_workers=0, pin_memory=False, drop_last=True
    )
    full = list(loader.epoch(3))
    loaded = []
    real = type(data.train).__getitem__
    type(data.train).__getitem__ = lambda self, key: loaded.append(key) or real(self, key)
    try:
        tail = list(loader.epoch(3, start=len(full) - 2))
    finally:
        type(data.train).__getitem__ = real
    assert len(tail) == 2 and len(loaded) == 32  # only the two batches left were read
    for (x, y), (fx, fy) in zip(tail, full[-2:]):
        assert torch.equal(x, fx) and torch.equal(y, fy)  # same images, same augmentation


# --------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, failing):
    path = tmp_path / "checkpoints" / "last.pt"
    save_torch(path, {"epoch": 1, "weights": torch.arange(5)})

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, failing.split(".")[1], boom)
    with pytest.raises(RunDirError, match=r"cannot write .*last\.pt: No space left on device"):
        save_torch(path, {"epoch": 2, "weights": torch.zeros(10_000)})
    monkeypatch.undo()
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_disk_full_during_a_run_stops_cleanly_and_the_run_resumes(spec_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_replace = os.replace
    writes = {"last.pt": 0}

    def replace(src, dst):
        if Path(dst).name == "last.pt":
            writes["last.pt"] += 1
            if writes["last.pt"] == 2:  # the disk fills up while epoch 1's checkpoint is written
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)
    assert main(["run", str(spec_path), "--out", str(out)]) == 1
    monkeypatch.undo()
    said = capsys.readouterr()
    assert "Traceback" not in said.out + said.err
    assert f"cannot write {out / 'checkpoints' / 'last.pt'}: No space left on device" in said.out.replace("\n", "")
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1  # epoch 0's, intact
    assert not (out / "summary.json").exists()  # not a finished-looking half run
    assert main(["run", str(spec_path), "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


@pytest.mark.parametrize(
    "error", [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only file system")]
)
def test_an_unwritable_run_directory_fails_before_training(spec_path, tmp_path, monkeypatch, capsys, error):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(rundir.tempfile, "mkstemp", refuse)
    out = tmp_path / "run"
    assert main(["run", str(spec_path), "--out", str(out)]) == 1
    said = capsys.readouterr()
    assert f"the run directory {out} is not writable: {error.strerror}" in said.out.replace("\n", "")
    assert "Traceback" not in said.out + said.err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_before_training(spec_path, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["run", str(spec_path), "--out", str(folder / "run")]) == 1
    finally:
        folder.chmod(0o755)
    assert "is not writable" in capsys.readouterr().out


def test_a_run_directory_that_is_a_file_is_a_clear_error(spec_path, tmp_path, capsys):
    taken = tmp_path / "run"
    taken.write_text("not a folder")
    assert main(["run", str(spec_path), "--out", str(taken), "--resume"]) == 1
    assert f"the run directory {taken} is a file" in capsys.readouterr().out
    assert taken.read_text() == "not a folder"
