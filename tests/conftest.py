from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (`-n auto`, the default in pyproject.toml) each worker gets its share of the
# cores: two workers of two threads each on two cores thrash instead of running twice as fast.
# Subprocesses the tests start (torchrun, sweep workers) inherit the setting.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Decisions timed by `train.channels_last: auto` are cached under $XDG_CACHE_HOME: the tests keep
# theirs in a folder of their own (per process, inherited by the subprocesses they start), never
# in the user's cache, and every run in one test process makes the same choice for the same set-up.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="surgery-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny 32 px models gain nothing from threads, and on a busy 2-core machine OpenMP threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped, with the reason, where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker cuda); none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


TINY_CBAM_SPEC = {
    "name": "tiny-cbam",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "surgery": [
        {"insert": "cbam", "at": ["layer3", "layer4"], "init": "identity"},
        {"insert": "se", "at": ["layer2"], "init": "identity"},
    ],
    "train": {"epochs": 2, "batch_size": 16, "limit_batches": 3},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A factory, `trained_run(spec, name) -> Path`: the finished run of `spec` (a mapping), trained once
    per session and name and shared by every test that only reads it. Read-only: a test that changes a
    run copies it first (shutil.copytree)."""
    from runs import train_quietly

    made: dict[str, Path] = {}

    def trained(spec: dict, name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp("shared-runs") / name
            train_quietly(spec, made[name])
        return made[name]

    return trained


@pytest.fixture(scope="session")
def tiny_run(trained_run):
    """resnet10t on digits at 32 px with CBAM after layer3 and layer4 and SE after layer2 (identity
    init), 2 epochs of 3 batches."""
    return trained_run(TINY_CBAM_SPEC, "tiny-cbam")
