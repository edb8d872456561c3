"""Every picture surgery draws goes through here: one figure factory, one figure-to-PNG step, and
the pictures more than one command shows (learning curves, the confusion matrix).

    figure(w, h)            a matplotlib Figure on the Agg canvas, outside pyplot: no window, no
                            global figure list to leak, nothing to close
    figure_png(fig, dpi)    the figure as PNG bytes (the one place that saves a figure)
    curves_png / confusion_png   the run report's curves; the confusion matrix of the run report
                            and of `surgery evaluate` (one look: colour = share of the true class,
                            counts or shares written in the cells, fonts scaled to the cell)

`plot_curves` and `plot_confusion` write them into a run directory. None of them needs torch.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import printable


def figure(width: float, height: float, **kwargs: Any) -> Any:
    """A new Figure (inches; `kwargs` for matplotlib's Figure, e.g. layout) drawn by the Agg
    canvas, never registered with pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any, dpi: int = 110, *, tight: bool = False) -> bytes:
    """A figure as PNG bytes; afterwards it is closed (a pyplot figure) and cleared, so it holds
    no memory however many a command draws.

    Args:
        tight: crop (or grow) the picture to what is drawn, labels included, instead of the
            figure's own size: for figures whose labels' length is not known in advance.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):  # a pyplot figure from elsewhere: draw it off-screen
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **({"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}))
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    fig.clear()
    return buffer.getvalue()


def label(name: Any, limit: int = 22) -> str:
    """A class or run name as a picture shows it: control characters as escapes, at most `limit`
    characters (the middle cut out)."""
    text = printable(name)
    if len(text) <= limit:
        return text
    tail = (limit - 1) // 2  # names often differ at the end ("... class 3"): keep both ends
    return text[: limit - 1 - tail] + "…" + text[len(text) - tail :]


def curves_png(rows: Sequence[Mapping[str, Any]], unfreeze: Mapping[int, list[str]]) -> bytes:
    """Loss and accuracy per epoch, with the epochs where groups unfreeze marked, as PNG bytes.

    Epochs are numbered from 1 on the axis, as the progress lines and the report number them
    (metrics.jsonl counts from 0); a group that unfreezes at epoch e (0-based) is marked
    between the last epoch without it and the first with it.
    """
    epochs = [r["epoch"] + 1 for r in rows]
    fig = figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in rows], "o-", label="val")
    for ax, title, corner in ((ax_loss, "loss", "upper right"), (ax_acc, "accuracy", "lower right")):
        for epoch, names in unfreeze.items():
            if epoch > 0:
                ax.axvline(epoch + 0.5, color="grey", linestyle="--", linewidth=1)
                ax.annotate(
                    "unfreeze " + ", ".join(map(label, names)),
                    (epoch + 0.5, 1),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                    color="grey",
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc=corner)
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    return figure_png(fig)


def confusion_png(
    matrix: Any, classes: Sequence[str], title: str = "confusion (validation, last epoch)", *, normalized: bool = False
) -> bytes:
    """`confusion_figure` as PNG bytes, grown to hold its labels."""
    return figure_png(confusion_figure(matrix, classes, title, normalized=normalized), tight=True)


def confusion_figure(
    matrix: Any, classes: Sequence[str], title: str = "confusion (validation, last epoch)", *, normalized: bool = False
) -> Any:
    """The confusion matrix: rows the true class, columns the predicted one.

    The colour is always the share of the true class's images given each label (a row without
    images stays white), so a small class reads like a large one; the cells hold the counts, or
    with `normalized` the shares (two decimals). Empty cells stay blank. The figure grows with
    the number of classes (up to 16 inches) and the cell text is sized to the cell, so counts
    stay readable at 10 and at 30 classes; past about 60 classes the cells are too small for
    text and only the colour is drawn.

    Args:
        matrix: counts, a tensor, array or nested lists (n x n).
        classes: the n class names (shown escaped and cut to 22 characters).
    """
    import numpy as np

    counts = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    names = [label(c) for c in classes]
    side = min(max(2.6 + 0.44 * n, 4.5), 16.0)  # the matrix itself, in inches
    cell = side * 72 / max(n, 1)  # points
    tick = float(np.clip(cell * 0.45, 6, 10))
    fig = figure(side + 1.2, side)  # the labels lie outside: figure_png(tight=True) makes room for them
    ax = fig.add_axes((0, 0, side / (side + 1.2), 1))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(names)), names, rotation=90 if n > 6 else 0, fontsize=tick)
    ax.set_yticks(range(len(names)), names, fontsize=tick)
    ax.set_xlabel("predicted", fontsize=10)
    ax.set_ylabel("true", fontsize=10)
    ax.set_title(printable(title), fontsize=11, loc="left")
    texts = [[f"{shares[i, j]:.2f}" if normalized else f"{int(counts[i, j])}" for j in range(n)] for i in range(n)]
    chars = max((len(t) for row in texts for t in row), default=1)
    # a digit is about 0.6 em wide: the widest cell text fills at most 85 % of the cell
    size = float(min(cell * 0.42, cell * 0.85 / (0.6 * chars), 13))
    if size >= 4.5:
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        texts[i][j],
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="white" if shares[i, j] > 0.55 else "#1d2430",
                    )
    bar = fig.colorbar(image, cax=fig.add_axes(((side + 0.25) / (side + 1.2), 0.1, 0.18 / (side + 1.2), 0.8)))
    bar.set_label("share of the true class", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return fig


def plot_curves(path: Path, rows: list[Mapping[str, Any]], unfreeze: Mapping[int, list[str]]) -> None:
    """Write `curves_png` to `path` atomically."""
    from ..files import atomic_write_bytes

    atomic_write_bytes(path, curves_png(rows, unfreeze))


def plot_confusion(path: Path, matrix: Any, classes: list[str]) -> None:
    """Write `confusion_png` to `path` atomically."""
    from ..files import atomic_write_bytes

    atomic_write_bytes(path, confusion_png(matrix, classes))
