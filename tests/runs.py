"""Training a spec inside a test and keeping what it printed (imported by the test files, as `browser` is)."""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from surgery.spec import load_spec
from surgery.train import run


def run_logged(spec: dict, out: Path, **kw) -> str:
    """`surgery.train.run` of `spec` into `out` (keyword arguments passed on); the printed log."""
    console = io.StringIO()
    run(load_spec(spec), out, console=Console(file=console, width=300), **kw)
    return console.getvalue()
