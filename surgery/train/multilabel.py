"""Figures of a multi-label evaluation (``data.multi_label``): scikit-learn's, on every image's
sigmoid probabilities gathered from all processes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MultiLabelMetrics:
    mean_ap: float  # macro average precision over the classes with at least one positive (0.0 if none has)
    exact_match: float  # images whose predicted set is exactly their label set
    f1: list[float]  # per class, predicted = probability >= threshold (0 when never true nor predicted)
    ap_classes: int  # how many classes the mean average precision covers


def multi_label_metrics(probs: np.ndarray, targets: np.ndarray, threshold: float) -> MultiLabelMetrics:
    """Mean average precision, exact-match ratio and per-class F1 of (images, classes) arrays.

    Example:
        >>> m = multi_label_metrics(np.array([[0.9, 0.2], [0.6, 0.7]]), np.array([[1, 0], [0, 1]]), 0.5)
        >>> m.mean_ap, m.exact_match, m.f1
        (1.0, 0.5, [0.6666666666666666, 1.0])
    """
    from sklearn.metrics import average_precision_score, f1_score

    truth = targets > 0.5
    if len(truth) == 0:
        return MultiLabelMetrics(0.0, 0.0, [0.0] * targets.shape[1], 0)
    predicted = probs >= threshold
    keep = truth.any(0)
    mean_ap = float(average_precision_score(truth[:, keep], probs[:, keep], average="macro")) if keep.any() else 0.0
    f1 = f1_score(truth, predicted, average=None, zero_division=0).tolist()
    return MultiLabelMetrics(
        mean_ap=mean_ap,
        exact_match=float((predicted == truth).all(1).mean()),
        f1=[float(v) for v in f1],
        ap_classes=int(keep.sum()),
    )
