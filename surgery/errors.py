"""The one error type for mistakes in a spec, and the helpers that word it."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

KeyPath = tuple  # ("surgery", 1, "at")


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


class SpecError(ValueError):
    """A mistake in a spec: where it is, what was found, what was expected.

    Attributes:
        problem: one line saying what is wrong.
        file, line, column: where (line and column 1-based; None for a spec given as a dict).
        path: the key path as text, e.g. ``surgery[1].at``.
        found, expected, hint: the offending value, what would have been valid, a suggestion.
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
    ) -> None:
        self.problem = problem
        self.key_path = tuple(path)
        self.path = format_path(path)
        self.found = found
        self.expected = expected
        self.hint = hint
        self.file = file
        self.line = line
        self.column = column
        super().__init__(str(self))

    @property
    def location(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where

    def __str__(self) -> str:
        if self.key_path or self.line is not None or self.file is None:
            lines = [f"{self.location}: {self.path}: {self.problem}"]
        else:  # about a whole file or a command-line argument: no key to name
            lines = [f"{self.location}: {self.problem}"]
        if self.found is not None:
            lines.append(f"  found:    {self.found}")
        if self.expected is not None:
            lines.append(f"  expected: {self.expected}")
        if self.hint:
            lines.append(f"  hint:     {self.hint}")
        return "\n".join(lines)

    def __reduce__(self):  # keep the keyword-only fields through pickling (multiprocessing, DDP)
        return (_rebuild, (self.problem, self.__dict__.copy()))


def _rebuild(problem: str, state: dict) -> SpecError:
    err = SpecError.__new__(SpecError)
    ValueError.__init__(err, problem)
    err.__dict__.update(state)
    return err


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    matches = close_matches(word, choices)
    return "did you mean " + " or ".join(repr(m) for m in matches) + "?" if matches else None
