"""The pictures only `surgery evaluate` draws: the reliability diagram and the gallery of the most
confident mistakes (its confusion matrices are `plots.confusion_png`, the run report's look). Each
function returns PNG bytes; `evaluate.write_folder` writes them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..pages.plots import figure, figure_png, label


def reliability_png(bins: Sequence[Mapping[str, Any]], ece: float, title: str) -> bytes:
    """Accuracy against mean confidence per confidence bin: a bar whose top meets its red mark
    (the bin's mean confidence) is calibrated, the hatched part is the gap. Below, how many images
    each bin holds."""
    fig = figure(6, 7)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower = np.array([b["lower"] for b in bins])
    width = float(bins[0]["upper"] - bins[0]["lower"])
    counts = np.array([b["count"] for b in bins])
    filled = counts > 0
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    ax.bar(
        lower[filled],
        accuracy[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy of the bin",
    )
    gap_bottom = np.minimum(accuracy, confidence)
    ax.bar(
        lower[filled],
        np.abs(confidence - accuracy)[filled],
        bottom=gap_bottom[filled],
        width=width,
        align="edge",
        fill=False,
        hatch="///",
        edgecolor="tab:red",
        linewidth=0,
        label="gap",
    )
    ax.hlines(
        confidence[filled],
        lower[filled],
        lower[filled] + width,
        colors="tab:red",
        linewidth=2,
        label="mean confidence of the bin",
    )
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
    return figure_png(fig, dpi=100)


def mistakes_png(shown: Sequence[tuple[torch.Tensor, Mapping[str, Any]]], title: str, images: int) -> bytes:
    """A grid of (image as the model saw it: uint8 C x H x W, its mistake {true, predicted,
    confidence}). One-channel images are drawn in gray, three-channel ones as they are (a gray
    image read as RGB has three equal channels, so it stays gray)."""
    if not shown:
        fig = figure(6, 1.6)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.4, f"no mistakes on these {images} images", ha="center", va="center", fontsize=12)
        ax.set_title(title, fontsize=10)
        fig.subplots_adjust(top=0.78)
        return figure_png(fig, dpi=100)
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    height = 2.9 * rows + 0.9
    fig = figure(max(2.5 * columns, 6.5), height)
    axes = fig.subplots(rows, columns, squeeze=False)
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
        ax.set_title(
            f"true: {label(mistake['true'])}\npredicted: {label(mistake['predicted'])} ({mistake['confidence']:.2f})",
            fontsize=9,
        )
    fig.suptitle(title, fontsize=10, y=1 - 0.25 / height)
    return figure_png(fig, dpi=100)
