"""Weight-space averaging of finished runs: WiSE-FT, model soups, SWA (`surgery average`).

    states.py   pure functions of state dicts: `interpolate` (WiSE-FT), `mean_state` (soups, SWA)
    norms.py    which BatchNorms trained, and their statistics recomputed (frozen ones left alone)
    sources.py  the runs read: finished, one architecture, one class list, one split
    command.py  `average_runs`: the method, the model's surroundings, the new run directory

Importing this package imports no torch: the names below load their module on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_FACE = {
    "average_runs": "command",
    "ALPHA_GRID": "command",
    "interpolate": "states",
    "mean_state": "states",
    "recalibrate": "norms",
    "trained_norms": "norms",
    "read_sources": "sources",
}


def __getattr__(name: str) -> Any:
    if name in _FACE:
        return getattr(import_module(f".{_FACE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_FACE)
