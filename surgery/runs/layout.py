"""The run directory's file names, defined once, and the run's headline metric, decided once.

runs/<name>/
  spec.yaml                      the resolved spec (defaults filled, overrides applied)
  load_report.json               what the surgery loaded, re-initialised, added
  classes.json, splits.json      class names; where the data was and each split's fingerprint
  metrics.jsonl, metrics.csv     one record per epoch
  checkpoints/last.pt            everything needed to resume
  checkpoints/best.safetensors   weights of the best epoch
  model.safetensors              final weights, loadable into a model rebuilt from spec.yaml
  model_ema.safetensors          the EMA of the weights (train.ema)
  summary.json, plots/curves.png, plots/confusion.png, report.html
  eval/<split>/                  `surgery evaluate`;  explain/  `surgery explain`;  export/  `surgery export`
"""

from __future__ import annotations

SPEC = "spec.yaml"
LOAD_REPORT = "load_report.json"
CLASSES = "classes.json"
SPLITS = "splits.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.safetensors"
FINAL = "model.safetensors"
EMA = "model_ema.safetensors"
CURVES = "plots/curves.png"
CONFUSION = "plots/confusion.png"
REPORT = "report.html"
EVAL = "eval"
EVAL_METRICS = "metrics.json"  # in eval/<split>/
EVAL_SHIFT = "shift.json"  # in eval/<split>-shift/ (evaluate --shift)
EXPLAIN = "explain"
EXPLAIN_PREDICTIONS = "predictions.json"  # in explain/
EXPORT = "export"

# `--weights`: which of a run's weight files to use
WEIGHT_CHOICES = {"final": FINAL, "best": BEST, "ema": EMA}
# without --weights: the final model, else the best epoch of a run that stopped early
DEFAULT_WEIGHTS = (FINAL, BEST)


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
    "CLASSES",
    "SPLITS",
    "METRICS",
    "SUMMARY",
    "LAST",
    "BEST",
    "FINAL",
    "EMA",
    "CURVES",
    "CONFUSION",
    "REPORT",
    "EVAL",
    "EVAL_METRICS",
    "EVAL_SHIFT",
    "EXPLAIN",
    "EXPLAIN_PREDICTIONS",
    "EXPORT",
    "WEIGHT_CHOICES",
    "DEFAULT_WEIGHTS",
    "headline",
    "headline_label",
]
