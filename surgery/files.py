"""Files on disk, the project's one layer for them (no torch): written so that a crash, a kill or a
full disk leaves the old version or the new one, never half; read, when a user names them, only
when they are regular files.

    atomic_write_bytes(path, data)   a temporary file beside `path`, fsynced, renamed over it
    write_with(path, write)          the same for a library that writes a file itself (an exporter)
    staging_folder(target)           a hidden folder beside `target` to fill before `swap_in`
    swap_in(staging, target)         the filled folder replaces `target` whole
    write_folder(folder, files)      both: a folder of files, in place at once or not at all
    file_mode() / folder_mode()      the modes a new file or folder gets under this process's umask

Every writer of the project (the run directory, evaluate, explain, export, the schema) writes
through here. Staging folders carry their process id (``.<name>.new-<pid>-<random>``), so a
folder a killed command left behind is removed by the next command that writes there, and
never one a running command is still filling. Importing this module does not import torch.

    not_regular(path) / open_regular(path)   why a path a user names is not a regular file / open it without blocking

Files a user names (spec, base, CSV, weights, images) are regular files only, checked without blocking.

A named pipe opened for reading waits for a writer forever, and a device may never end, so every
file a command reads on a user's word goes through `not_regular` (before the open) or
`open_regular` (the open itself, race-free): a FIFO, socket, device or folder is said to be one,
never opened. Path mistakes the operating system reports as exceptions (a NUL character, a name
longer than the system allows) come back as a reason too, so callers word one located error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

from .errors import Origin, RunDirError

__all__ = [
    "atomic_write_bytes",
    "write_raw",
    "write_text",
    "write_json",
    "jsonable",
    "write_with",
    "replace_with",
    "staging_folder",
    "swap_in",
    "write_folder",
    "make_staging",
    "remove_stale",
    "remove_temporaries",
    "check_writable",
    "fsync_folder",
    "file_mode",
    "folder_mode",
    "problem",
    "PATH_PROBLEMS",
    "LONG_PATH",
    "NUL_PATH",
    "not_regular",
    "open_regular",
    "read_regular",
    "NotRegularFile",
    "shown_path",
]


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    umask = os.umask(0o022)  # the only way to read the umask is to set it: done once per process
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode `open` would give a new file (mkstemp's are private, 0600: a run's files are not)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode `mkdir` would give a new folder (mkdtemp's are private, 0700)."""
    return 0o777 & ~_umask()


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` survive a power cut (best effort; Windows has no such call)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half.

    Raises:
        RunDirError: the folder cannot be written (read-only, disk full, ...); `path` is untouched.
    """
    write_with(path, lambda tmp: write_raw(tmp, data))


def write_raw(path: Path, data: bytes) -> None:
    """Bytes into a file, plainly: the one place the project's writers put bytes on disk (a
    library that would write a file itself serialises into memory and comes here instead, so a
    full disk is an OSError, never an abort in C++)."""
    with open(path, "wb") as f:
        f.write(data)


def write_with(path: Path, write: Callable[[Path], None], *, catch: tuple[type[BaseException], ...] = ()) -> None:
    """Let `write(tmp)` write a temporary file beside `path`, then put it in place (fsynced, renamed).

    For libraries that write files themselves (torch.export.save, onnx, torch.jit): a failure
    there, including a C++ writer's RuntimeError on a full disk, leaves no partial file.

    Args:
        catch: further exception types of `write` to report as a RunDirError (OSError always is).

    Raises:
        RunDirError: the folder cannot be written; `path` is untouched and the temporary file gone.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
    except OSError as exc:
        raise RunDirError(f"cannot write in {path.parent}: {_reason(exc)}", origin=Origin.path(path.parent)) from None
    try:
        _fill_and_replace(tmp, path, write)
    except (OSError, *catch) as exc:
        raise RunDirError(f"cannot write {path}: {_reason(exc)}", origin=Origin.path(path)) from None
    fsync_folder(path.parent)


def replace_with(path: Path, write: Callable[[Path], None]) -> None:
    """`write_with` for a caller that words its own error: the folder must exist, and any
    OSError is raised as it is (nothing is left behind)."""
    path = Path(path)
    _fill_and_replace(_temporary(path), path, write)
    fsync_folder(path.parent)


def _temporary(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _fill_and_replace(tmp: Path, path: Path, write: Callable[[Path], None]) -> None:
    try:
        write(tmp)
        with contextlib.suppress(OSError):  # mkstemp's file is private; the written one is as readable as any
            os.chmod(tmp, file_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=jsonable) + "\n")


def jsonable(value: Any) -> Any:
    """`json.dumps`' default for what runs record: tensors, paths, numpy scalars."""
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files a killed process left behind (they are never read)."""
    for leftover in Path(folder).rglob(".*.tmp"):  # atomic_write_bytes's and check_writable's
        with contextlib.suppress(OSError):
            leftover.unlink()


def check_writable(folder: Path, name: Path | None = None) -> None:
    """Fail before the work, not after an hour, when `folder` cannot be written.

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
        raise RunDirError(
            f"the run directory {shown} is not writable: {exc.strerror or exc}", origin=Origin.path(shown)
        ) from None


# --------------------------------------------------------------------------- folders, whole
_STAGING = re.compile(r"\.(?P<name>.+)\.(?:new|old)-(?P<pid>\d+)-[^/]*")
_LEGACY = re.compile(r"\.(?P<name>.+)\.(?:new|old)-[a-z0-9_]{8}")  # before the pid was in the name


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return True
    return True


def _started() -> float:
    """When this process started (a staging folder older than that, without a pid, is no one's)."""
    with contextlib.suppress(OSError):
        return os.stat(f"/proc/{os.getpid()}").st_mtime
    return _FIRST_IMPORT


_FIRST_IMPORT = __import__("time").time()


def remove_stale(target: Path) -> list[Path]:
    """Remove the staging and put-aside folders of `target` whose process is gone (a `kill -9`,
    a power cut): ``.<name>.new-<pid>-*`` and ``.<name>.old-<pid>-*`` beside it. Folders of a
    process still running are left alone; one named without a pid (an older version) is removed
    when it is older than this process. Returns what was removed."""
    target = Path(target)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING.fullmatch(entry.name)
        if match is not None and match["name"] == target.name:
            stale = not _alive(int(match["pid"]))
        else:
            legacy = _LEGACY.fullmatch(entry.name)
            if legacy is None or legacy["name"] != target.name:
                continue
            try:
                stale = entry.lstat().st_mtime < _started()
            except OSError:
                continue
        if stale and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_folder(target: Path, kind: str = "new") -> Path:
    """A new hidden folder beside `target`, ``.<name>.<kind>-<pid>-<random>``, with the mode of any
    new folder; stale ones of earlier, killed commands are removed first (`remove_stale`).

    Raises:
        RunDirError: the parent folder cannot be written.
    """
    target = Path(target)
    try:
        return make_staging(target, kind)
    except OSError as exc:
        raise RunDirError(
            f"cannot write in {target.parent}: {_reason(exc)}", origin=Origin.path(target.parent)
        ) from None


def make_staging(target: Path, kind: str = "new") -> Path:
    """`staging_folder`, raising the OSError for the caller to word."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    folder.chmod(folder_mode())
    return folder


def swap_in(staging: Path, target: Path, *, what: str = "the new files") -> None:
    """Put the filled `staging` folder in place of `target`; an earlier `target` is removed once
    the new one is there (and put back if the swap fails).

    Raises:
        RunDirError: the swap failed; `target` is as it was.
    """
    staging, target = Path(staging), Path(target)
    old: Path | None = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(staging, target)
    except OSError as exc:
        if old is not None and (old / "previous").exists() and not target.exists():
            os.replace(old / "previous", target)
        raise RunDirError(
            f"cannot put {what} in place of {target}: {_reason(exc)}", origin=Origin.path(target)
        ) from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fsync_folder(target.parent)


def write_folder(folder: Path, files: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
    """Write every file into a staging folder beside `folder`, then swap it into place: a write
    that fails or is killed leaves the previous folder whole; a parent made for nothing is removed.

    Raises:
        RunDirError: a file or the folder cannot be written (nothing changed then).
    """
    folder = Path(folder)
    parent_existed = folder.parent.exists()
    staging: Path | None = None
    try:
        staging = staging_folder(folder)
        for name, data in files.items() if isinstance(files, Mapping) else files:
            atomic_write_bytes(staging / name, data)
        swap_in(staging, folder)
        staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if not parent_existed and folder.parent.is_dir() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()


# --------------------------------------------------------------------------- reading what a user names
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


def _describe_mode(mode: int) -> str:
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


LONG_PATH = "a path longer than the system allows"
NUL_PATH = "a path with a NUL character"
PATH_PROBLEMS = (LONG_PATH, NUL_PATH)  # the path itself is unusable, whatever is or is not on disk


def problem(what: str, why: str, not_a_file: str | None = None) -> str:
    """The first line of an error about a file `not_regular` refused: 'the base file does not exist',
    'the base path cannot be used: a path longer than the system allows', else `not_a_file`
    ('the base is not a file'; the default names `why`: 'the base is a named pipe')."""
    if why == "no such file":
        return f"the {what} file does not exist"
    if why in PATH_PROBLEMS:
        return f"the {what} path cannot be used: {why}"
    return not_a_file or f"the {what} is {why}"


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return LONG_PATH
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "no such file"
    if exc.errno == errno.ELOOP:
        return "a loop of symbolic links"
    return f"cannot be read ({exc.strerror or exc})"


def not_regular(path: str | os.PathLike) -> str | None:
    """None when `path` is a regular file (symbolic links followed); else why not, in a few words:
    'no such file', 'a folder', 'a named pipe', 'a path longer than the system allows', ...

    Example:
        >>> not_regular("/dev/null")
        'a device'
    """
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # os.stat refuses a NUL byte before asking the system
        return NUL_PATH
    except OSError as exc:
        return _describe_os_error(exc)
    return None if stat.S_ISREG(mode) else _describe_mode(mode)


class NotRegularFile(OSError):
    """`open_regular` was pointed at something that is not a regular file; `reason` says what."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({reason})", str(path))
        self.reason = reason


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading in binary mode; anything else raises `NotRegularFile`
    (an OSError) without waiting: the open does not block on a named pipe (O_NONBLOCK), and the
    descriptor's own type is checked, so a file swapped for a pipe after a check is refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except ValueError:
        raise NotRegularFile(path, NUL_PATH) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, _describe_mode(mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return io.open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of a regular file (at most `limit` of them); `NotRegularFile` for anything else."""
    with open_regular(path) as f:
        return f.read() if limit is None else f.read(limit)


def shown_path(path: str | os.PathLike) -> str:
    """A path as messages print it: normalised (`a/./b/../c` -> `a/c`)."""
    return os.path.normpath(str(Path(path)))
