"""The pictures of `surgery evaluate`: confusion matrices, the reliability diagram and the gallery of
the most confident mistakes. Each function returns PNG bytes; `evaluate.write_folder` writes them.
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str, *, normalized: bool) -> bytes:
    """scikit-learn's `ConfusionMatrixDisplay` of the counts, or of each row divided by its total
    (the share of a true class's images given each label; a class without images stays 0).
    Values are written in the cells up to 30 classes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    if normalized:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    else:
        values = counts
    size = min(4.5 + 0.5 * n, 18)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    display = ConfusionMatrixDisplay(values, display_labels=list(classes))
    display.plot(ax=ax, cmap="Blues", include_values=n <= 30, values_format=".2f" if normalized else "d",
                 xticks_rotation=90 if n > 6 else "horizontal", colorbar=True,
                 im_kw={"vmin": 0, "vmax": 1} if normalized else None,
                 text_kw={"fontsize": 8 if n <= 12 else 6})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def reliability_png(bins: Sequence[Mapping[str, Any]], ece: float, title: str) -> bytes:
    """Accuracy against mean confidence per confidence bin: a bar whose top meets its red mark
    (the bin's mean confidence) is calibrated, the hatched part is the gap. Below, how many images
    each bin holds."""
    plt = _pyplot()
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower = np.array([b["lower"] for b in bins])
    width = float(bins[0]["upper"] - bins[0]["lower"])
    counts = np.array([b["count"] for b in bins])
    filled = counts > 0
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    ax.bar(lower[filled], accuracy[filled], width=width, align="edge", color="tab:blue", edgecolor="black",
           linewidth=0.6, label="accuracy of the bin")
    gap_bottom = np.minimum(accuracy, confidence)
    ax.bar(lower[filled], np.abs(confidence - accuracy)[filled], bottom=gap_bottom[filled], width=width, align="edge",
           fill=False, hatch="///", edgecolor="tab:red", linewidth=0, label="gap")
    ax.hlines(confidence[filled], lower[filled], lower[filled] + width, colors="tab:red", linewidth=2,
              label="mean confidence of the bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nexpected calibration error {ece:.4f} ({len(bins)} bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_count.bar(lower, counts, width=width, align="edge", color="tab:grey", edgecolor="black", linewidth=0.6)
    ax_count.set_xlabel("confidence of the predicted class")
    ax_count.set_ylabel("images")
    ax_count.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def mistakes_png(shown: Sequence[tuple[torch.Tensor, Mapping[str, Any]]], title: str, images: int) -> bytes:
    """A grid of (image as the model saw it: uint8 C x H x W, its mistake {true, predicted,
    confidence}). One-channel images are drawn in gray, three-channel ones as they are (a gray
    image read as RGB has three equal channels, so it stays gray)."""
    plt = _pyplot()
    if not shown:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.4, f"no mistakes on these {images} images", ha="center", va="center", fontsize=12)
        ax.set_title(title, fontsize=10)
        fig.subplots_adjust(top=0.78)
        return _png(fig)
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    height = 2.9 * rows + 0.9
    fig, axes = plt.subplots(rows, columns, figsize=(max(2.5 * columns, 6.5), height), squeeze=False)
    # fixed margins: tight_layout measures every title and costs more than the drawing
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.95 / height, wspace=0.1, hspace=0.35)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, mistake) in zip(axes.flat, shown):
        pixels = image.permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"true: {_short(mistake['true'])}\npredicted: {_short(mistake['predicted'])} "
                     f"({mistake['confidence']:.2f})", fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.25 / height)
    return _png(fig)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
