"""Training a spec inside a test (imported by the test files, as `browser` is): quietly, or keeping what it
printed. The session's shared finished runs come from the `trained_run` fixture (conftest.py), built on these."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from surgery.spec import Spec, load_spec
from surgery.train import run


def train_quietly(spec: dict | str | Path | Spec, out: Path, **kw: Any) -> dict:
    """`surgery.train.run` of `spec` (a mapping, a file or a loaded Spec) into `out`, printing nothing;
    keyword arguments are passed on. Returns the run's summary."""
    return run(spec if isinstance(spec, Spec) else load_spec(spec), out, console=Console(file=io.StringIO()), **kw)


def run_logged(spec: dict, out: Path, **kw: Any) -> str:
    """`surgery.train.run` of `spec` into `out` (keyword arguments passed on); the printed log."""
    console = io.StringIO()
    run(load_spec(spec), out, console=Console(file=console, width=300), **kw)
    return console.getvalue()
