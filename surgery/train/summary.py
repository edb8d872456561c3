"""`summary.json`: the figures of a finished run, and what it ran on."""

from __future__ import annotations

import platform
from typing import Any, Mapping

import torch

from .context import Context
from .loop import EpochResult


def summary_of(
    ctx: Context, rows: list[dict[str, Any]], best: Mapping[str, Any], final: EpochResult, wall: float
) -> dict[str, Any]:
    import timm
    import torchvision

    spec, env = ctx.spec, ctx.dist
    return {
        "name": spec.name,
        "backbone": spec.model.backbone,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "final": rows[-1] if rows else None,
        "final_val_acc": final.acc,
        "final_val_loss": final.loss,
        "val_images": final.seen,
        **(_multi_label(ctx, best, final) if final.confusion is None else _single_label(ctx, final)),
        "epochs": len(rows),
        "wall_seconds": wall,
        "device": str(ctx.runtime.device),
        "precision": ctx.runtime.precision,
        "channels_last": ctx.runtime.channels_last,
        "compiled": bool(ctx.runtime.compile),
        # processes, and whether their weights were bit-identical at the end (true for one process)
        "world_size": env.world_size,
        "batch_size_per_process": spec.train.batch_size,
        "global_batch_size": spec.train.batch_size * env.world_size,
        # images per optimizer step (train.accumulate batches of the global batch)
        "accumulate": spec.train.accumulate,
        "effective_batch_size": spec.train.batch_size * env.world_size * spec.train.accumulate,
        "ranks_consistent": True,
        "data": ctx.data.describe,
        "balance": balance_of(ctx),
        "params": {
            "total": sum(p.numel() for p in ctx.model.parameters()),
            "inserted": sum(m["params"] for m in ctx.built.report.inserted_modules),
            "adapters": sum(a["params"] for a in ctx.built.report.adapters),
            "trainable_at_end": sum(p.numel() for p in ctx.model.parameters() if p.requires_grad),
        },
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
    }


def _single_label(ctx: Context, final: EpochResult) -> dict[str, Any]:
    f1 = _f1(final.confusion)
    return {
        "per_class_accuracy": dict(zip(ctx.data.classes, final.per_class)),  # the recall of each class
        "val_macro_f1": sum(f1) / max(len(f1), 1),
        "per_class_f1": dict(zip(ctx.data.classes, f1)),
        "confusion_matrix": final.confusion.tolist(),
    }  # rows: true class, columns: predicted


def _multi_label(ctx: Context, best: Mapping[str, Any], final: EpochResult) -> dict[str, Any]:
    # final_val_acc / best_val_acc are exact-match ratios here; the best epoch is the best mAP
    f1 = final.per_class
    return {
        "multi_label": True,
        "threshold": ctx.spec.data.threshold,
        "acc_basis": "exact match",
        "best_val_map": best.get("val_map"),
        "final_val_map": final.mean_ap,
        "val_macro_f1": sum(f1) / max(len(f1), 1),
        "per_class_f1": dict(zip(ctx.data.classes, f1)),
    }


def balance_of(ctx: Context) -> dict[str, Any]:
    """`data.balance` and what it was computed from: the training count of every class and, with
    ``loss``, the weight of every class in the training loss (multi-label: BCE's pos_weight)."""
    from ..data import train_counts

    classes = ctx.data.classes
    counts = train_counts(ctx.data.train, len(classes)).tolist()
    weights = ctx.class_weights.tolist() if ctx.class_weights is not None else None
    return {
        "mode": ctx.spec.data.balance,
        "train_counts": dict(zip(classes, counts)),
        "class_weights": dict(zip(classes, weights)) if weights is not None else None,
    }


def _f1(confusion: torch.Tensor) -> list[float]:
    """Per-class F1 from a confusion matrix (rows true, columns predicted): 2TP / (2TP + FP + FN),
    0 for a class never seen nor predicted (scikit-learn's f1_score with zero_division=0)."""
    c = confusion.double()
    tp = c.diag()
    denominator = 2 * tp + (c.sum(0) - tp) + (c.sum(1) - tp)
    return torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1e-12), torch.zeros_like(tp)).tolist()
