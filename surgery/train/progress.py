"""What a run shows while it trains: rich bars on a terminal, one plain line per epoch elsewhere."""

from __future__ import annotations

import time
from typing import Any, Mapping


class Progress:
    """Rich progress bars on a terminal, one plain line per epoch elsewhere (CI, logs); silent off rank 0."""

    def __init__(self, console: Any, total_epochs: int, enabled: bool = True) -> None:
        self.console = console
        self.total = total_epochs
        self.enabled = enabled
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.bar.start()
            self.task = None

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch + 1}/{self.total}", total=steps, completed=done, info="")
            self._t0, self._n, self._loss = time.perf_counter(), 0, 0.0

    def step(self, loss: float, batch: int) -> None:
        if self.bar is not None:
            self._n += batch
            self._loss = loss if self._loss == 0.0 else 0.9 * self._loss + 0.1 * loss
            rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
            self.bar.update(self.task, advance=1, info=f"loss {self._loss:.3f}  {rate:.0f} img/s")

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def epoch_line(row: Mapping[str, Any], total: int) -> str:
    """One epoch's figures on one line: losses, accuracies, each group's lr or 'frozen', speed."""
    groups = "  ".join(f"{g}={'%.2g' % row['lr'][g] if on else 'frozen'}" for g, on in row["trainable"].items())
    top5 = f" top5 {row['val_top5']:.3f}" if row.get("val_top5") is not None else ""
    if row.get("val_map") is not None:  # multi-label: acc is the exact-match ratio
        top5 = f" mAP {row['val_map']:.3f}"
    return (
        f"epoch {row['epoch'] + 1:>3}/{total}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}{top5}  [{groups}]  "
        f"{row['images_per_sec']:.0f} img/s  {row['seconds']:.1f}s"
    )
