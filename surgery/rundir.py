"""The run directory: the files other tools read, each written atomically (temporary file, then rename).

    runs/<name>/
      spec.yaml            the resolved spec (defaults filled, overrides applied)
      load_report.json     what the surgery loaded, re-initialised, added
      metrics.jsonl        one JSON object per epoch
      checkpoints/last.pt  everything needed to resume
      checkpoints/best.safetensors   weights of the best epoch
      model.safetensors    final surgered weights, loadable into a model rebuilt from spec.yaml
      summary.json, classes.json, plots/curves.png, plots/confusion.png
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


class RunDirError(OSError):
    """The run directory cannot be written (read-only, disk full, ...)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half.

    Every file of a run directory is written here: a temporary file beside the target, flushed
    to disk, renamed over it, then the folder flushed so the rename survives a power cut.

    Raises:
        RunDirError: the folder cannot be written (read-only, disk full, ...); `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunDirError(f"cannot write in {path.parent}: {exc.strerror or exc}") from None
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file private (0600); a run's files are as readable as any
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None
    _fsync_folder(path.parent)


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    umask = os.umask(0o022)  # the only way to read the umask is to set it, once
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: renames are not made durable this way
        return
    with contextlib.suppress(OSError):  # the file is in place; durability of the rename is best effort
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files a killed process left behind (they are never read)."""
    for leftover in Path(folder).rglob(".*.tmp"):  # atomic_write_bytes's and check_writable's
        with contextlib.suppress(OSError):
            leftover.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl (a torn last line from a crash is ignored)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def write_metrics(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole (atomically): small, and resume never duplicates an epoch."""
    write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def check_writable(folder: Path) -> None:
    """Fail before training, not after an hour, when the run directory cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise RunDirError(f"the run directory {folder} is not writable: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- plots
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
