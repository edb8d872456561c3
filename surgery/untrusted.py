"""Strings a user controls (class names, run folders, spec and file names) made safe for where
they go: a link on a page, or a terminal.

    href(path)              a path relative to the page -> './'-prefixed, percent-encoded URL
                            (a folder named ``javascript:alert(1)`` stays a folder)
    printable(text)         (errors.printable) control characters (ESC, BEL, CR, ...) and bidi overrides written
                            as ``\\x1b``, ``\\u202e``: what the terminal shows is what is there
    label_problem(name)     why a class name cannot be one (None when it can): the datasets
                            refuse such names where they enter, with the CSV line or folder
    Console                 rich's Console with `printable` applied to every string it renders
                            (messages, markup, table cells): what every command prints through

The page templates use `href` as their jinja filter; every command prints through `Console`
(the CLI's error printer too, since messages quote values), so an old run's classes.json, a run
folder or an image file name cannot move the cursor, retitle the window or clear the screen.
"""

from __future__ import annotations

from pathlib import PurePath, PurePosixPath
from typing import Any
from urllib.parse import quote

import rich.console

from .errors import printable


def label_problem(name: str) -> str | None:
    """Why `name` cannot be a class name (it would reach terminals and pages), or None.

    Example:
        >>> label_problem("cat\\x1b[2J")
        "holds the control character '\\\\x1b' (an escape a terminal would obey)"
    """
    bad = next((ch for ch in name if not ch.isprintable()), None)
    if bad is None:
        return None
    return f"holds the control character '{printable(bad)}' (an escape a terminal would obey)"


def href(target: str | PurePath | None) -> str:
    """A link to a file given relative to the page (or absolute), safe in ``href=""``.

    A relative path gets a ``./`` prefix (unless it climbs with ``../``) so no folder name can
    read as a URL scheme, and every character outside ``A-Za-z0-9_.-~/`` is percent-encoded
    (``#``, ``?``, ``%``, ``:`` and spaces are part of the name, not of the URL). An absolute
    path becomes a ``file://`` URI.

    Example:
        >>> href("javascript:alert(1)/report.html")
        './javascript%3Aalert%281%29/report.html'
    """
    if target is None:
        return ""
    path = PurePath(target)
    if path.is_absolute():
        return path.as_uri()
    posix = PurePosixPath(*path.parts).as_posix()
    encoded = quote(posix, safe="/")
    return encoded if encoded == ".." or encoded.startswith("../") else "./" + encoded.removeprefix("./")


class Console(rich.console.Console):
    """rich's Console, but every string it renders goes through `printable` first (newlines kept):
    markup and styles still work, a user's control characters are shown, never obeyed. Strings in
    tables and f-strings are covered alike; a `rich.text.Text` built by hand is not."""

    def render_str(self, text: str, **kwargs: Any) -> Any:
        return super().render_str(printable(text), **kwargs)


__all__ = ["href", "printable", "label_problem", "Console"]
