"""The run directory's file names, defined once, and the run's headline metric, decided once.

runs/<name>/
  spec.yaml                      the resolved spec (defaults filled, overrides applied)
  load_report.json               what the surgery loaded, re-initialised, added
  tuning.json                    settings chosen by measurement (channels_last, precision, compile) and their timings
  classes.json, splits.json      class names; where the data was and each split's fingerprint
  metrics.jsonl, metrics.csv     one record per epoch
  checkpoints/last.pt            everything needed to resume
  checkpoints/best.safetensors   weights of the best epoch
  checkpoints/epoch-NNNN.safetensors  weights after epoch NNNN (from 1), the last train.keep_epochs of them
  model.safetensors              final weights, loadable into a model rebuilt from spec.yaml
  model_ema.safetensors          the EMA of the weights (train.ema)
  summary.json, plots/curves.png, plots/confusion.png, report.html
  eval/<split>/                  `surgery evaluate`;  explain/  `surgery explain`;  export/  `surgery export`
"""

from __future__ import annotations

from pathlib import Path

SPEC = "spec.yaml"
LOAD_REPORT = "load_report.json"
TUNING = "tuning.json"
CLASSES = "classes.json"
SPLITS = "splits.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.safetensors"
FINAL = "model.safetensors"
EMA = "model_ema.safetensors"
EPOCH_PREFIX = "checkpoints/epoch-"
CURVES = "plots/curves.png"
CONFUSION = "plots/confusion.png"
REPORT = "report.html"
EVAL = "eval"
EVAL_METRICS = "metrics.json"  # in eval/<split>/
EVAL_PREDICTIONS = "predictions.jsonl"  # in eval/<split>/: one line per image
EVAL_SHIFT = "shift.json"  # in eval/<split>-shift/ (evaluate --shift)
EXPLAIN = "explain"
EXPLAIN_PREDICTIONS = "predictions.json"  # in explain/
EXPORT = "export"

# `--weights`: which of a run's weight files to use
WEIGHT_CHOICES = {"final": FINAL, "best": BEST, "ema": EMA}
# without --weights: the final model, else the best epoch of a run that stopped early
DEFAULT_WEIGHTS = (FINAL, BEST)


def epoch_weights(epoch: int) -> str:
    """The file of the weights after 0-based `epoch` (``train.keep_epochs``): named from 1, as the log counts."""
    return f"{EPOCH_PREFIX}{epoch + 1:04d}.safetensors"


def kept_epochs(folder: Path) -> list[Path]:
    """The kept epoch weight files in a run directory, oldest first."""
    found = (Path(folder) / EPOCH_PREFIX).parent.glob(Path(EPOCH_PREFIX).name + "*.safetensors")
    return sorted(p for p in found if epoch_of(p) >= 0)


def epoch_of(path: Path) -> int:
    """The 0-based epoch a kept weight file holds (-1: not such a file)."""
    number = Path(path).name.removeprefix(Path(EPOCH_PREFIX).name).removesuffix(".safetensors")
    return int(number) - 1 if number.isdigit() and Path(path).name.startswith(Path(EPOCH_PREFIX).name) else -1


def headline(multi_label: bool) -> str:
    """The metrics-row key a run is judged by, for its best epoch, the report and comparisons:
    ``val_map`` (mean average precision) for a multi-label run, else ``val_acc``."""
    return "val_map" if multi_label else "val_acc"


def headline_label(metric: str) -> str:
    """How the page and the tables name a headline metric."""
    return {"val_acc": "val acc", "val_map": "val mAP"}.get(metric, metric)


__all__ = [
    "SPEC",
    "LOAD_REPORT",
    "TUNING",
    "CLASSES",
    "SPLITS",
    "METRICS",
    "SUMMARY",
    "LAST",
    "BEST",
    "FINAL",
    "EMA",
    "EPOCH_PREFIX",
    "epoch_weights",
    "kept_epochs",
    "epoch_of",
    "CURVES",
    "CONFUSION",
    "REPORT",
    "EVAL",
    "EVAL_METRICS",
    "EVAL_PREDICTIONS",
    "EVAL_SHIFT",
    "EXPLAIN",
    "EXPLAIN_PREDICTIONS",
    "EXPORT",
    "WEIGHT_CHOICES",
    "DEFAULT_WEIGHTS",
    "headline",
    "headline_label",
]
