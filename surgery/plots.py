"""The run's pictures: learning curves with unfreeze epochs marked, and the confusion matrix."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch

from .rundir import atomic_write_bytes


def plot_curves(path: Path, rows: list[Mapping[str, Any]], unfreeze: Mapping[int, list[str]]) -> None:
    """Loss and accuracy per epoch, with the epochs where groups unfreeze marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in rows], "o-", label="val")
    for ax, title, corner in ((ax_loss, "loss", "upper right"), (ax_acc, "accuracy", "lower right")):
        for epoch, names in unfreeze.items():
            if epoch > 0:
                ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1)
                ax.annotate("unfreeze " + ", ".join(names), (epoch - 0.5, 1), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=8, color="grey")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc=corner)
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_confusion(path: Path, matrix: torch.Tensor, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    m = matrix.float()
    normalised = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_title("confusion (validation, last epoch)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
