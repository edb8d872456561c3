"""Checkpoints written in the background (`surgery.runs.writer.BackgroundWriter`): in order, atomic,
complete before the run ends, errors not lost, and written from a copy training cannot change."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from surgery.errors import RunDirError
from surgery.runs.writer import BackgroundWriter, RunDir, snapshot


def test_writes_land_in_order_and_wait_returns_when_all_are_on_disk(tmp_path):
    from surgery.files import atomic_write_bytes

    writer = BackgroundWriter()
    gate = threading.Event()
    target = tmp_path / "last.pt"

    def slow_first() -> None:
        gate.wait(5)
        atomic_write_bytes(target, b"epoch 1")

    writer.submit(slow_first)
    writer.submit(lambda: atomic_write_bytes(target, b"epoch 2"))
    assert not target.exists()  # nothing written until the first write may go
    gate.set()
    writer.wait()
    assert target.read_bytes() == b"epoch 2"
    writer.close()


def test_a_failed_write_is_raised_by_the_next_wait(tmp_path):
    writer = BackgroundWriter()
    folder = tmp_path

    def fail() -> None:
        raise RunDirError("the disk is full")

    writer.submit(fail)
    writer.submit(lambda: (folder / "after").write_text("x"))
    with pytest.raises(RunDirError, match="the disk is full"):
        writer.wait()
    assert (folder / "after").read_text() == "x"  # later writes still ran
    writer.wait()  # reported once
    writer.close()


def test_snapshot_is_a_copy_training_cannot_change():
    model = torch.nn.Linear(2, 2)
    state = {"model": model.state_dict(), "rows": [{"epoch": 0}], "step": (1, torch.ones(1))}
    copied = snapshot(state)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(copied["model"]["weight"], model.weight)
    assert isinstance(copied["model"], collections.OrderedDict) and hasattr(copied["model"], "_metadata")
    assert torch.nn.Linear(2, 2).load_state_dict(copied["model"]) is not None
    assert copied["rows"] == [{"epoch": 0}] and isinstance(copied["step"], tuple)


def test_release_finishes_the_background_writes(tmp_path):
    rundir = RunDir(tmp_path / "run")
    rundir.claim(resume=False, overwrite=False)
    rundir.start()
    gate = threading.Event()
    threading.Timer(0.2, gate.set).start()

    def write() -> None:
        gate.wait(5)
        (rundir.folder / "late").write_text("done")

    rundir.writes.submit(write)
    rundir.release()
    assert (tmp_path / "run" / "late").read_text() == "done"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    """A process killed while its background thread writes a large checkpoint: last.pt is the old
    one, whole, never half of the new one."""
    target = tmp_path / "last.pt"
    old = os.urandom(1000)
    target.write_bytes(old)
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        import surgery.files as files
        from surgery.runs.writer import BackgroundWriter

        real = files.write_raw

        def slow(path, data):  # half the bytes, then stall (killed here)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                print("half", flush=True)
                time.sleep(60)
            real(path, data)

        files.write_raw = slow
        writer = BackgroundWriter()
        writer.submit(lambda: files.atomic_write_bytes(Path({str(target)!r}), b"new" * 1_000_000))
        writer.wait()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "half"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert target.read_bytes() == old
