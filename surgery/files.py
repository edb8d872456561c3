"""Files a user names (spec, base, CSV, weights, images): regular files only, checked without blocking.

A named pipe opened for reading waits for a writer forever, and a device may never end, so every
file a command reads on a user's word goes through `not_regular` (before the open) or
`open_regular` (the open itself, race-free): a FIFO, socket, device or folder is said to be one,
never opened. Path mistakes the operating system reports as exceptions (a NUL character, a name
longer than the system allows) come back as a reason too, so callers word one located error.
"""
from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


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


__all__ = ["problem", "PATH_PROBLEMS", "LONG_PATH", "NUL_PATH", "not_regular", "open_regular", "read_regular", "NotRegularFile", "shown_path"]
