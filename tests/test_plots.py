"""surgery.pages.plots: the one place a figure becomes a PNG, and a confusion matrix readable at 10 and 30 classes."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgery.pages.plots import confusion_figure, confusion_png, curves_png, figure, figure_png

SURGERY = Path(__file__).resolve().parent.parent / "surgery"
DPI = 110


def test_one_module_turns_figures_into_pngs() -> None:
    """No second copy of the figure-to-PNG code, no pyplot state, and no second confusion-matrix look."""
    for path in sorted(SURGERY.rglob("*.py")):
        text = path.read_text()
        if path.name != "plots.py":
            assert "savefig(" not in text, path
            assert "matplotlib" not in text or "BytesIO" not in text, path  # a figure drawn into memory by hand
        assert "import matplotlib.pyplot" not in text and "matplotlib.use(" not in text, path
        assert "ConfusionMatrixDisplay" not in text, path
        assert not re.search(r"^def confusion_png", text, flags=re.M) or path.name == "plots.py", path


def test_figure_png_leaves_no_figure_open() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    png = figure_png(figure(2, 1))
    rows = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "train_acc": 0.5, "val_acc": 0.4}
        for e in range(3)
    ]
    curves_png(rows, {1: ["body"]})
    confusion_png(np.eye(3) * 4, ["a", "b", "c"])
    other = plt.figure()  # a pyplot figure from elsewhere is closed too
    figure_png(other)
    assert png.startswith(b"\x89PNG") and plt.get_fignums() == before


@pytest.mark.parametrize("n", [10, 30])
@pytest.mark.parametrize("normalized", [False, True])
def test_confusion_cells_are_readable(n: int, normalized: bool, tmp_path: Path) -> None:
    """Every non-empty cell holds its count (or share), at least 14 px tall, inside its cell; the
    colour is the share of the true class."""
    rng = np.random.default_rng(n)
    counts = rng.integers(0, 9, (n, n))
    counts[np.arange(n), np.arange(n)] = rng.integers(100, 999, n)
    counts[0, :] = 0  # a class without images: white, no text
    classes = [f"class {i}" for i in range(n)]
    fig = confusion_figure(counts, classes, normalized=normalized)
    ax = fig.axes[0]
    fig.canvas.draw()
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert set(texts) == {(i, j) for i, j in zip(*np.nonzero(counts))}
    shares = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    assert np.allclose(ax.images[0].get_array(), shares)
    renderer = fig.canvas.get_renderer()
    to_pixels = ax.transData.transform
    for (i, j), text in texts.items():
        assert text.get_text() == (f"{shares[i, j]:.2f}" if normalized else str(counts[i, j]))
        assert text.get_fontsize() * DPI / 72 >= 14  # px in the PNG (saved at 110 dpi)
        box = text.get_window_extent(renderer)
        (left, top), (right, bottom) = to_pixels((j - 0.5, i - 0.5)), to_pixels((j + 0.5, i + 0.5))
        assert left <= box.x0 and box.x1 <= right and min(top, bottom) <= box.y0 and box.y1 <= max(top, bottom)
    picture = Image.open(io.BytesIO(confusion_png(counts, classes, normalized=normalized)))
    (tmp_path / f"confusion-{n}.png").write_bytes(confusion_png(counts, classes))  # to look at
    assert picture.width >= 700 and picture.height >= 650
