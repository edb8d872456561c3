"""The run directory: held by one run at a time, swapped into place only once the run has
started, and every file in it written atomically (temporary file, then rename).

    runs/<name>/
      spec.yaml            the resolved spec (defaults filled, overrides applied)
      load_report.json     what the surgery loaded, re-initialised, added
      metrics.jsonl        one JSON object per epoch
      checkpoints/last.pt  everything needed to resume
      checkpoints/best.safetensors   weights of the best epoch
      model.safetensors    final surgered weights, loadable into a model rebuilt from spec.yaml
      summary.json, classes.json, plots/curves.png, plots/confusion.png
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import Origin, RunDirError

if TYPE_CHECKING:  # torch is imported where tensors are written: reports and comparisons write text without it
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half.

    Every file of a run directory is written here: a temporary file beside the target, flushed
    to disk, renamed over it, then the folder flushed so the rename survives a power cut.

    Raises:
        RunDirError: the folder cannot be written (read-only, disk full, ...); `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunDirError(f"cannot write in {path.parent}: {exc.strerror or exc}") from None
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file private (0600); a run's files are as readable as any
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None
    _fsync_folder(path.parent)


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    umask = os.umask(0o022)  # the only way to read the umask is to set it, once
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: renames are not made durable this way
        return
    with contextlib.suppress(OSError):  # the file is in place; durability of the rename is best effort
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files a killed process left behind (they are never read)."""
    for leftover in Path(folder).rglob(".*.tmp"):  # atomic_write_bytes's and check_writable's
        with contextlib.suppress(OSError):
            leftover.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_torch(path: Path, obj: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl (a torn last line from a crash is ignored)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def write_metrics(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole (atomically): small, and resume never duplicates an epoch."""
    write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def check_writable(folder: Path, name: Path | None = None) -> None:
    """Fail before training, not after an hour, when the run directory cannot be written.

    `name`: the folder to name in the message (the run directory, when `folder` is its staging copy).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        shown = name or folder
        raise RunDirError(f"the run directory {shown} is not writable: {exc.strerror or exc}",
                          origin=Origin.path(shown)) from None


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
        self._lock: _Lock | None = None

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.pt"

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
            raise RunDirError(f"the run directory {self.path} is a file", origin=Origin.path(self.path),
                              expected="a folder, or a path that does not exist yet")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"the run directory {self.path} is not writable: {exc.strerror or exc}",
                              origin=Origin.path(self.path)) from None
        self._lock = _Lock.take(self.path)
        holds_run = self.path.is_dir() and any(self.path.iterdir())
        if resume and holds_run:
            check_writable(self.path)
            remove_temporaries(self.path)
            return
        if holds_run and not overwrite:
            self.release()
            raise RunDirError(f"the run directory {self.path} already holds a run", origin=Origin.path(self.path),
                              expected="a new run directory", exit_code=2,
                              hint="continue it with --resume, write elsewhere with --out DIR, or replace it "
                                   "with --overwrite")
        try:
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.new-", dir=self.path.parent))
        except OSError as exc:
            self.release()
            raise RunDirError(f"the run directory {self.path} is not writable: {exc.strerror or exc}",
                              origin=Origin.path(self.path)) from None
        self.folder = self._staging
        check_writable(self._staging, name=self.path)

    def start(self) -> None:
        """Put the staging folder in place of the run directory (a previous run there is removed)."""
        if self._staging is None:
            return
        old: Path | None = None
        try:
            if self.path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
                os.replace(self.path, old / "run")
            os.replace(self._staging, self.path)
        except OSError as exc:
            if old is not None and (old / "run").exists() and not self.path.exists():
                os.replace(old / "run", self.path)  # put the previous run back
            raise RunDirError(f"cannot put the new run in place of {self.path}: {exc.strerror or exc}",
                              origin=Origin.path(self.path)) from None
        self._staging, self.folder = None, self.path
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_folder(self.path.parent)

    def release(self) -> None:
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


class _Lock:
    """An exclusive lock on ``.<name>.lock`` beside a run directory (the run directory itself may be
    replaced while held). Released on `release` or when the process ends, however it ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, run_dir: Path) -> "_Lock | None":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are not guarded
            return None
        path = run_dir.parent / f".{run_dir.name}.lock"
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunDirError(f"the run directory {run_dir} is not writable: {exc.strerror or exc}",
                                  origin=Origin.path(run_dir)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 100).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirError(f"another run is using {run_dir} ({holder})", origin=Origin.path(run_dir),
                                  expected="one run per run directory at a time",
                                  hint="wait for it to finish, or write elsewhere with --out DIR") from None
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


