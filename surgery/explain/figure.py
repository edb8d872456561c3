"""The `surgery explain` figure for one image: the input, the CAM of the surgered model, the CAM
without the inserted modules, and each inserted module's gates.

Maps are drawn over the image by grad-cam's own `show_cam_on_image` (OpenCV's jet colormap),
with a colour bar that states the scale: a CAM is relative (grad-cam scales each map to 0..1),
a gate is absolute (its own values, e.g. a sigmoid's 0..1). Channel weights have no place in the
image: they are drawn as bars, one per channel, in channel order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .attention import Gate, ModuleAttention

if TYPE_CHECKING:
    from ..deploy.predict import LoadedRun
    from .results import Explained, Layers

DISPLAY_PX = 224  # small inputs (32 px digits) are drawn at this size, maps upsampled bilinearly
_COLUMNS = 3


def _as_rgb(image) -> np.ndarray:
    """uint8 C x H x W -> float H x W x 3 in [0, 1]; one channel repeated (gray stays gray)."""
    array = image.detach().cpu().numpy().astype(np.float32) / 255.0
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return np.ascontiguousarray(array[:3].transpose(1, 2, 0))


def _is_gray(image) -> bool:
    return image.shape[0] == 1 or bool((image[0] == image[1]).all() and (image[1] == image[2]).all())


def _resize(array: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(np.float32(array), (side, side), interpolation=cv2.INTER_LINEAR)


def _overlay(rgb: np.ndarray, heat: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The map over the image, its values placed on the lo..hi scale the colour bar shows."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    side = rgb.shape[0]
    if hi <= lo:  # one value: placed where _colour_bar's scale puts it
        lo, hi = (0.0, 1.0) if 0 <= lo <= 1 else (lo - 0.5, hi + 0.5)
    scaled = (heat - lo) / (hi - lo)
    return show_cam_on_image(rgb, np.clip(_resize(scaled, side), 0, 1), use_rgb=True, image_weight=0.5)


def _colour_bar(fig, ax, lo: float, hi: float, label: str) -> None:
    import matplotlib as mpl

    if hi <= lo:  # one value: a bar around it, so the colour still reads as that value
        lo, hi = (0.0, 1.0) if 0 <= lo <= 1 else (lo - 0.5, hi + 0.5)
    mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(lo, hi), cmap="jet")
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _map_panel(fig, ax, rgb: np.ndarray, heat: np.ndarray, title: str, *, relative: bool) -> None:
    lo, hi = (0.0, 1.0) if relative else (float(heat.min()), float(heat.max()))
    ax.imshow(_overlay(rgb, heat, lo, hi))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    _colour_bar(fig, ax, lo, hi, "relative (0 = least, 1 = most)" if relative else "gate value")


def _cam_title(what: str, cam: np.ndarray) -> str:
    return what + ("\n(flat: no positive evidence at this layer)" if float(cam.max()) <= 0 else "")


def _gate_panel(fig, ax, rgb: np.ndarray, module: ModuleAttention, gate: Gate) -> None:
    branch = gate.branch.removesuffix(".gate")
    branch = f" ({branch} branch)" if branch and branch not in ("channel", "spatial") else ""
    if gate.kind == "channel":
        values = gate.values.numpy()
        # one filled step artist, not a bar per channel: 512 bars would take seconds to lay out
        ax.stairs(values, np.arange(len(values) + 1) - 0.5, fill=True, color="tab:blue", baseline=0)
        ax.set_xlim(-0.5, len(values) - 0.5)
        if values.min() >= 0 and values.max() <= 1:
            ax.set_ylim(0, 1)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_ylabel("weight", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(
            f"{len(values)} channel weights{branch}: mean {values.mean():.3f} "
            f"(min {values.min():.3f}, max {values.max():.3f})",
            fontsize=9,
        )
        return
    heat = gate.values.numpy()
    h, w = heat.shape
    what = "spatial map" if gate.kind == "spatial" else f"gate mean over {gate.channels} channels"
    single = f", one value {float(heat.flat[0]):.3f}" if heat.size == 1 else ""
    _map_panel(fig, ax, rgb, heat, f"{what} {h}x{w}{branch}{single}", relative=False)


def _module_note(module: ModuleAttention) -> str:
    head = f"{module.path} ({module.kind})"
    if module.gate_value is None:
        return head + ", init default: output = attention(input)"
    effect = ": no effect yet" if module.gate_value == 0 else ""
    return (
        head + f", identity gate {module.gate_value:+.3g}{effect}  (output = input + gate x (attention(input) - input))"
    )


def _panels(item: "Explained") -> list[tuple[ModuleAttention, Gate | None, int]]:
    """(module, gate or None for a note, columns) for every inserted module, spatial maps first."""
    out: list[tuple[ModuleAttention, Gate | None, int]] = []
    for module in item.attention.values():
        if module.unreadable:
            out.append((module, None, _COLUMNS))
            continue
        gates = sorted(module.gates, key=lambda g: g.kind == "channel")
        for gate in gates:
            wide = _COLUMNS - 1 if len(gates) > 1 else _COLUMNS
            out.append((module, gate, 1 if gate.kind != "channel" else wide))
    return out


def _rows(
    panels: list[tuple[ModuleAttention, Gate | None, int]],
) -> list[list[tuple[ModuleAttention, Gate | None, int]]]:
    rows: list[list] = []
    for panel in panels:  # a module's panels stay together on a row when they fit
        if rows and sum(p[2] for p in rows[-1]) + panel[2] <= _COLUMNS and rows[-1][-1][0] is panel[0]:
            rows[-1].append(panel)
        else:
            rows.append([panel])
    return rows


# the figure's layout in inches, fixed: a layout engine (constrained, tight) costs more than the drawing
_WIDTH, _LEFT, _RIGHT, _GAP = 13.0, 0.5, 0.9, 1.25
_TOP, _BOTTOM, _ROW_GAP = 0.75, 0.5, 1.2
_FIRST_ROW, _ROW, _NOTE_ROW = 3.6, 2.5, 0.35


def _layout(rows: list[list]) -> tuple[float, list[tuple[float, float]]]:
    """Figure height and (top, height) of each row, in inches from the top; row 0 is the CAM row."""
    heights = [_FIRST_ROW] + [_NOTE_ROW if all(gate is None for _, gate, _ in row) else _ROW for row in rows]
    spans, y = [], _TOP
    for h in heights:
        spans.append((y, h))
        y += h + _ROW_GAP
    return y - _ROW_GAP + _BOTTOM, spans


def _axes(fig, total: float, span: tuple[float, float], col: int, width: int):
    column = (_WIDTH - _LEFT - _RIGHT - (_COLUMNS - 1) * _GAP) / _COLUMNS
    left = _LEFT + col * (column + _GAP)
    right = left + width * column + (width - 1) * _GAP
    top, height = span
    return fig.add_axes((left / _WIDTH, 1 - (top + height) / total, (right - left) / _WIDTH, height / total))


def render(item: "Explained", run: "LoadedRun", layers: "Layers", method: str) -> bytes:
    """The PNG for one image (bytes; the caller writes it)."""
    from ..pages.plots import figure, figure_png
    from .results import METHODS

    classes = run.classes
    side = max(DISPLAY_PX, int(item.image.shape[-1]))
    rgb = _resize(_as_rgb(item.image), side)
    rows = _rows(_panels(item))
    total, spans = _layout(rows)
    fig = figure(_WIDTH, total)
    name = METHODS[method]
    explained = classes[item.explained]

    top = [_axes(fig, total, spans[0], c, 1) for c in range(_COLUMNS)]
    gray = _is_gray(item.image)
    top[0].imshow(rgb[..., 0] if gray else rgb, cmap="gray" if gray else None, vmin=0, vmax=1)
    top[0].set_title(
        f"input, {item.image.shape[-1]}x{item.image.shape[-2]} px as the model sees it" + (" (gray)" if gray else ""),
        fontsize=9,
    )
    top[0].axis("off")
    _map_panel(
        fig,
        top[1],
        rgb,
        item.cam,
        _cam_title(f"{name} of the trained model\nfor {explained!r} at {layers.label}", item.cam),
        relative=True,
    )
    if item.backbone_cam is not None:
        _map_panel(
            fig,
            top[2],
            rgb,
            item.backbone_cam,
            _cam_title(
                f"{name} without its inserted modules\nfor {explained!r} (it predicts "
                f"{classes[item.backbone_predicted]!r}, {item.backbone_confidence:.3f})",
                item.backbone_cam,
            ),
            relative=True,
        )
    else:
        note = item.backbone_note or "no inserted modules:\nthe model is its backbone"
        top[2].text(0.5, 0.5, note, ha="center", va="center", fontsize=10)
        top[2].axis("off")
    fig.suptitle(
        f"{item.path.name}: predicted {classes[item.predicted]!r} ({item.confidence:.3f}); "
        f"explaining {explained!r} with {name} at {layers.label}  [run {run.spec.name}]",
        fontsize=11,
        y=1 - 0.2 / total,
        va="top",
    )

    for span, row in zip(spans[1:], rows):
        col = 0
        for module, gate, width in row:
            ax = _axes(fig, total, span, col, width)
            col += width
            if gate is None:
                ax.text(
                    0.0, 1.0, f"no attention to show: {module.unreadable}", ha="left", va="top", fontsize=9, wrap=True
                )
                ax.axis("off")
            else:
                _gate_panel(fig, ax, rgb, module, gate)
        fig.text(
            0.1 / _WIDTH,
            1 - (span[0] - 0.55) / total,
            _module_note(row[0][0]),
            fontsize=10,
            ha="left",
            va="bottom",
            color="dimgray",
        )
    return figure_png(fig, dpi=90)


__all__ = ["render", "DISPLAY_PX"]
