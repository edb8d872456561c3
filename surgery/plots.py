"""The run's pictures: learning curves with unfreeze epochs marked, and the confusion matrix.

`curves_png` and `confusion_png` draw into memory (the report page embeds them); `plot_curves`
and `plot_confusion` write them into a run directory. None of them needs torch.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files and memory only, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any) -> bytes:
    """A figure as PNG bytes (110 dpi), closed afterwards."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    return buffer.getvalue()


def curves_png(rows: Sequence[Mapping[str, Any]], unfreeze: Mapping[int, list[str]]) -> bytes:
    """Loss and accuracy per epoch, with the epochs where groups unfreeze marked, as PNG bytes.

    Epochs are numbered from 1 on the axis, as the progress lines and the report number them
    (metrics.jsonl counts from 0); a group that unfreezes at epoch e (0-based) is marked
    between the last epoch without it and the first with it.
    """
    plt = pyplot()
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in rows], "o-", label="val")
    for ax, title, corner in ((ax_loss, "loss", "upper right"), (ax_acc, "accuracy", "lower right")):
        for epoch, names in unfreeze.items():
            if epoch > 0:
                ax.axvline(epoch + 0.5, color="grey", linestyle="--", linewidth=1)
                ax.annotate("unfreeze " + ", ".join(names), (epoch + 0.5, 1), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=8, color="grey")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc=corner)
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    return figure_png(fig)


def confusion_png(matrix: Any, classes: Sequence[str]) -> bytes:
    """The confusion matrix (rows true, columns predicted; a tensor or nested lists), rows
    normalised for the colour, counts written in the cells up to 20 classes, as PNG bytes."""
    import numpy as np

    plt = pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    size = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    normalised = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_title("confusion (validation, last epoch)")
    fig.tight_layout()
    return figure_png(fig)


def plot_curves(path: Path, rows: list[Mapping[str, Any]], unfreeze: Mapping[int, list[str]]) -> None:
    """Write `curves_png` to `path` atomically."""
    from .rundir import atomic_write_bytes

    atomic_write_bytes(path, curves_png(rows, unfreeze))


def plot_confusion(path: Path, matrix: Any, classes: list[str]) -> None:
    """Write `confusion_png` to `path` atomically."""
    from .rundir import atomic_write_bytes

    atomic_write_bytes(path, confusion_png(matrix, classes))
