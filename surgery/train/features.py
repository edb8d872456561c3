"""Head-only stages on cached features: switch the cache on or off when the trainable set changes."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..data import make_loader
from .cache import build_cache, cache_key, plan
from .context import Context
from .loop import images_to_device, set_train_mode


def _key(ctx: Context, head: str) -> str:
    rt = ctx.runtime
    return cache_key(
        ctx.model,
        head,
        {
            "data": ctx.spec.raw["data"],
            "seed": ctx.spec.seed,
            "classes": ctx.data.classes,
            "train": len(ctx.data.train),
            "val": len(ctx.data.val),
            "precision": rt.precision,
            "channels_last": rt.channels_last,
            "device": rt.device.type,
            "transform": repr(getattr(ctx.data.train, "transform", "")),
        },
    )


def _in_order(ctx: Context, dataset) -> object:
    """One pass over `dataset` in its own order, with the run's batch size."""
    return make_loader(
        dataset,
        batch_size=ctx.spec.train.batch_size,
        train=False,
        seed=ctx.spec.seed,
        num_workers=ctx.spec.data.num_workers,
        pin_memory=ctx.runtime.pin_memory,
    ).epoch(0)


def use_feature_cache(ctx: Context, flags: Mapping[str, bool], out_dir: Path | None = None) -> str:
    """Switch the head-only cache on or off for a new trainable set; return a line for the log.

    Only the head trains and nothing before it is random: the frozen body runs once over both
    sets and the head trains on its outputs (same order, same inputs as uncached). The body is
    frozen for as long as the trainable set stays the same, so the cache stays valid until then.
    """
    ctx.features = None
    set_train_mode(ctx.model, ctx.built.groups, flags)
    random_batches = tuple(ctx.batch_augment.reasons()) if ctx.batch_augment is not None else ()
    ok, why = plan(
        ctx.model,
        ctx.built.head,
        ctx.data.deterministic_train,
        ctx.spec.train.cache_features,
        ctx.dist.world_size,
        random_batches,
    )
    if not ok:
        return f"head-only stage, running uncached: {why}" if why else ""
    head = ctx.built.head[0]
    built = build_cache(
        ctx.model,
        head,
        _key(ctx, head),
        _in_order(ctx, ctx.data.train),
        len(ctx.data.train),
        _in_order(ctx, ctx.data.val),
        len(ctx.data.val),
        lambda x, y: images_to_device(ctx, x, y),
        ctx.runtime.autocast,
        out_dir / "cache" if out_dir is not None else None,
    )
    set_train_mode(ctx.model, ctx.built.groups, flags)
    if isinstance(built, str):
        return f"head-only stage, running uncached: {built}"
    ctx.features = built
    return (
        f"head-only stage: {why}; the frozen body ran once over {len(built.train) + len(built.val)} images "
        f"in {built.seconds:.1f}s and the head trains on its cached outputs (cache {built.key}, {built.where})"
    )
