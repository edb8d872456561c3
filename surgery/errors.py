"""The one error family for mistakes a user can fix, and the helpers that word it.

    UserError                 something the user can fix; says where it came from (its `origin`)
    ├── SpecError             a spec value: file, line, column and key path (a `--set` value too)
    ├── UsageError            a command-line argument or an environment variable
    └── RunDirError           a run directory: taken, locked, unreadable, not writable

The command line prints any of them in a few lines, without a traceback, and exits with the
error's `exit_code` (2 for a mistake in what was asked, 1 when the machine or a folder is at fault).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def format_path(path: Sequence) -> str:
    """("surgery", 1, "at") -> "surgery[1].at"; () -> "(top level)"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def close_matches(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The closest real names to a misspelt one, best first."""
    return difflib.get_close_matches(str(word), sorted(set(choices)), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    matches = close_matches(word, choices)
    return "did you mean " + " or ".join(repr(m) for m in matches) + "?" if matches else None


def printable(text: Any, *, newlines: bool = True) -> str:
    """`text` with every control or invisible formatting character escaped (a NUL as ``\\x00``, a
    tab as ``\\t``, an ANSI escape as ``\\x1b``, a right-to-left override as ``\\u202e``): a user
    value quoted in a message, a table or a page can neither hide itself nor drive the terminal.

    Args:
        newlines: keep line breaks (a multi-line message); False escapes them too (a table cell).
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if (newlines and c == "\n") or c.isprintable() else repr(c)[1:-1] for c in text)


def shorten(text: Any, limit: int = 160) -> str:
    """One line of at most `limit` characters (messages quote library errors and user values)."""
    lines = printable(text).strip().splitlines() or [""]
    line = lines[0] + (" ..." if len(lines) > 1 else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def quote_value(value: Any, limit: int = 80) -> str:
    """A spec value as a user wrote it (JSON-like; strings quoted), cut to `limit` characters."""
    import json

    text = json.dumps(value, default=str) if not isinstance(value, str) else printable(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """`ValueError: the first line of its message` for quoting a library's error."""
    return shorten(f"{exc.__class__.__name__}: {str(exc).strip() or '(no message)'}", limit)


@dataclass(frozen=True)
class Origin:
    """Where a value came from.

    kind: 'file' (a spec or other file, with line and column when known), 'flag' (a command-line
    option and its value, such as ``--set train.epochs=0`` or ``--device cuda:9``), 'env' (an
    environment variable) or 'path' (a folder or file the command was pointed at).
    """

    kind: str
    name: str
    value: str | None = None
    line: int | None = None
    column: int | None = None

    @classmethod
    def file(cls, name: str | None, line: int | None = None, column: int | None = None) -> "Origin | None":
        return None if name is None else cls("file", str(name), line=line, column=column)

    @classmethod
    def flag(cls, name: str, value: Any = None) -> "Origin":
        return cls("flag", name, None if value is None else str(value))

    @classmethod
    def env(cls, name: str, value: Any = None) -> "Origin":
        return cls("env", name, None if value is None else str(value))

    @classmethod
    def path(cls, name: Any) -> "Origin":
        return cls("path", str(name))

    @property
    def label(self) -> str:
        """The origin without line and column: a file's path, ``--set a.b=1``, ``$VAR``."""
        if self.kind == "flag":
            return self.name if self.value is None else f"{self.name} {self.value}"
        if self.kind == "env":
            return f"${self.name}" if self.value is None else f"${self.name}={self.value}"
        return self.name

    def __str__(self) -> str:
        text = self.label
        if self.line is not None:
            text += f":{self.line}"
            if self.column is not None:
                text += f":{self.column}"
        return text


class UserError(ValueError):
    """A mistake the user can fix: what is wrong, where it came from, what was expected.

    Attributes:
        problem: one line saying what is wrong.
        origin: where the offending value came from (`Origin`), or None.
        found, expected, hint: the offending value, what would have been valid, a suggestion.
        exit_code: what the command line exits with (2: a mistake in what was asked).
    """

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        origin: Origin | None = None,
        found: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.origin = origin
        self.found = found
        self.expected = expected
        self.hint = hint
        super().__init__(str(self))

    @property
    def location(self) -> str:
        return str(self.origin) if self.origin is not None else "<spec>"

    def _head(self) -> str:
        return f"{self.location}: {self.problem}"

    def __str__(self) -> str:
        # every message is printed through here: user values in it (a path with a NUL, a name with
        # an ANSI escape) are escaped once, whichever check quoted them
        lines = [printable(self._head())]
        if self.found is not None:
            lines.append(f"  found:    {printable(self.found)}")
        if self.expected is not None:
            lines.append(f"  expected: {printable(self.expected)}")
        if self.hint:
            lines.append(f"  hint:     {printable(self.hint)}")
        return "\n".join(lines)

    def __reduce__(self):  # keep the keyword-only fields through pickling (multiprocessing, DDP)
        return (_rebuild, (type(self), self.problem, self.__dict__.copy()))


def _rebuild(cls: type, problem: str, state: dict) -> UserError:
    err = cls.__new__(cls)
    ValueError.__init__(err, problem)
    err.__dict__.update(state)
    return err


class SpecError(UserError):
    """A mistake in a spec value: the file (or `--set` flag), line, column and key path.

    Attributes (besides `UserError`'s):
        key_path: the key path as a tuple, e.g. ``("surgery", 1, "at")``; `path` the same as text.
        file, line, column: the origin's label, line and column (None for a spec given as a dict).
    """

    def __init__(
        self,
        problem: str,
        *,
        path: Sequence = (),
        found: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        origin: Origin | None = None,
    ) -> None:
        self.key_path = tuple(path)
        self.path = format_path(path)
        if origin is None:
            origin = Origin.file(file, line, column)
        super().__init__(problem, origin=origin, found=found, expected=expected, hint=hint)

    @property
    def file(self) -> str | None:
        return self.origin.label if self.origin is not None else None

    @property
    def line(self) -> int | None:
        return self.origin.line if self.origin is not None else None

    @property
    def column(self) -> int | None:
        return self.origin.column if self.origin is not None else None

    def _head(self) -> str:
        if self.key_path or self.line is not None or self.origin is None:
            return f"{self.location}: {self.path}: {self.problem}"
        return f"{self.location}: {self.problem}"  # about a whole file: no key to name


class UsageError(UserError):
    """A command-line argument or environment variable that cannot be used (``--device foo``)."""


class RunDirError(UserError):
    """A run directory that cannot be used: taken, locked by another run, unreadable or not writable.

    Exit code 1 (the folder is at fault), or 2 when what was asked does not fit it (a run that
    is there already without --resume or --overwrite, a resume with another spec).
    """

    exit_code = 1

    def __init__(self, problem: str, *, exit_code: int | None = None, **kw: Any) -> None:
        super().__init__(problem, **kw)
        if exit_code is not None:
            self.exit_code = exit_code


__all__ = [
    "UserError",
    "SpecError",
    "UsageError",
    "RunDirError",
    "Origin",
    "format_path",
    "close_matches",
    "did_you_mean",
    "shorten",
    "quote_value",
    "describe_exception",
    "printable",
]
