"""Writing a run directory: held by one run at a time, swapped into place only once the run has
started, and every file in it written atomically through `surgery.files` (its names: `layout`).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import Origin, RunDirError
from ..files import (
    atomic_write_bytes,
    check_writable,
    jsonable,
    make_staging,
    remove_temporaries,
    swap_in,  # noqa: F401
    write_text,
)
from .layout import LAST

if TYPE_CHECKING:  # torch is imported where tensors are written: reports and comparisons write text without it
    import torch


def save_torch(path: Path, obj: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))


class BackgroundWriter:
    """Writes that need not hold up training (a checkpoint, the best weights), done in order by one
    thread while the next epoch trains. Each write is atomic as always (`surgery.files`): a process
    killed mid-write leaves the previous file. `wait` returns once every submitted write is on disk
    and raises the first one's error; the runner waits before anything reads those files, before
    the next checkpoint is written and before the run ends, so the last checkpoint is complete
    before the process exits.

    What is submitted must not change afterwards: tensors are copied first (`snapshot`).
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-writer")
        self._pending: list[Any] = []

    def submit(self, write: Any) -> None:
        self._pending.append(self._pool.submit(write))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]  # every write finishes (or fails) before this returns
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """Wait for every write, then stop the thread (errors are raised, as `wait` does)."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def snapshot(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU (containers rebuilt), for a write in the background
    while training changes the originals in place."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = {k: snapshot(v) for k, v in obj.items()}
        if isinstance(obj, collections.OrderedDict):  # a state_dict: its _metadata (module versions) kept
            copied = collections.OrderedDict(copied)
            if hasattr(obj, "_metadata"):
                copied._metadata = obj._metadata  # type: ignore[attr-defined]
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def write_metrics(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole (atomically): small, and resume never duplicates an epoch."""
    write_text(path, "".join(json.dumps(r, default=jsonable) + "\n" for r in rows))


# --------------------------------------------------------------------------- the run directory
class RunDir:
    """One run's folder, held by this process from `claim` to `release`.

        claim(resume, overwrite)  lock it (a second run into the same folder is refused) and check
                                  it may be used: empty, or --resume, or --overwrite
        start()                   called once the run is built and its first files are written: a new
                                  or overwritten run is written into a hidden staging folder beside it
                                  until here, so a mistake found while building leaves the previous run
                                  (or nothing at all) in place; here the staging folder replaces it
        release()                 unlock; a staging folder that never started is deleted

    `folder` is where files go now: the staging folder before `start`, the run directory after.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.folder = self.path
        self._staging: Path | None = None
        self._lock: RunLock | None = None
        self._writes: BackgroundWriter | None = None

    @property
    def writes(self) -> BackgroundWriter:
        """The writes done while training goes on (checkpoints); `release` waits for them."""
        if self._writes is None:
            self._writes = BackgroundWriter()
        return self._writes

    @property
    def checkpoint(self) -> Path:
        return self.folder / LAST

    @property
    def started(self) -> bool:
        return self._staging is None

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Lock the run directory and choose where this run writes.

        Raises:
            RunDirError: a file is in the way, another run holds the folder, it holds a run and
                neither --resume nor --overwrite was given (exit code 2), or it is not writable.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(
                f"the run directory {self.path} is a file",
                origin=Origin.path(self.path),
                expected="a folder, or a path that does not exist yet",
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"the run directory {self.path} is not writable: {exc.strerror or exc}", origin=Origin.path(self.path)
            ) from None
        self._lock = RunLock.take(self.path)
        holds_run = self.path.is_dir() and any(self.path.iterdir())
        if resume and holds_run:
            check_writable(self.path)
            remove_temporaries(self.path)
            return
        if holds_run and not overwrite:
            self.release()
            raise RunDirError(
                f"the run directory {self.path} already holds a run",
                origin=Origin.path(self.path),
                expected="a new run directory",
                exit_code=2,
                hint="continue it with --resume, write elsewhere with --out DIR, or replace it with --overwrite",
            )
        try:
            self._staging = make_staging(self.path)  # and removes the staging folders of killed runs
        except OSError as exc:
            self.release()
            raise RunDirError(
                f"the run directory {self.path} is not writable: {exc.strerror or exc}", origin=Origin.path(self.path)
            ) from None
        self.folder = self._staging
        check_writable(self._staging, name=self.path)

    def start(self) -> None:
        """Put the staging folder in place of the run directory (a previous run there is removed)."""
        if self._staging is None:
            return
        swap_in(self._staging, self.path, what="the new run")
        self._staging, self.folder = None, self.path

    def release(self) -> None:
        """Finish the background writes, remove an unstarted staging folder, unlock. A write that
        failed here is not raised: the run is ending on another error already (the normal path
        waits for its writes itself), and an atomic write that failed left the previous file."""
        if self._writes is not None:
            with contextlib.suppress(Exception):
                self._writes.close()
            self._writes = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging, self.folder = None, self.path
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunLock:
    """An exclusive lock on ``.<name>.lock`` beside a run directory (the run directory itself may be
    replaced while held). Released on `release` or when the process ends, however it ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, run_dir: Path) -> "RunLock | None":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are not guarded
            return None
        path = run_dir.parent / f".{run_dir.name}.lock"
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunDirError(
                    f"the run directory {run_dir} is not writable: {exc.strerror or exc}", origin=Origin.path(run_dir)
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 100).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirError(
                    f"another run is using {run_dir} ({holder})",
                    origin=Origin.path(run_dir),
                    expected="one run per run directory at a time",
                    hint="wait for it to finish, or write elsewhere with --out DIR",
                ) from None
            # the lock file may have been removed by its previous holder between our open and lock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}".encode())
                return cls(path, fd)
            os.close(fd)
        raise RunDirError(f"cannot lock {run_dir}: its lock file keeps changing", origin=Origin.path(run_dir))

    def release(self) -> None:
        import fcntl

        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
