"""Cached features for head-only stages: run the frozen body once, then train the head on its outputs.

While only the classifier head trains, and nothing before it is random (deterministic transforms,
no active dropout or drop-path, normalization frozen), the input the head receives for a given
image is the same every epoch. So it is computed once and the head trains on it directly: an
epoch costs a pass of a Linear layer instead of a forward pass of the whole network.

The cache can never be stale: its key hashes every tensor of the frozen body, the transforms,
the data selection, precision and memory format; anything else means another key. It lives in
memory, or in a memory-mapped file in the run directory when it is large.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..model.modes import evaluating

DISK_THRESHOLD_BYTES = 2 * 1024**3
STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
BATCH_STATISTICS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class FeatureCache:
    key: str
    head: str
    train: torch.Tensor  # features of every training item, in dataset order
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    seconds: float = 0.0
    where: str = "memory"


def _random_modules(model: nn.Module, head: str) -> list[str]:
    """Modules before the head that would make its input differ from one epoch to the next."""
    found = []
    if model.training and getattr(model, "drop_rate", 0):  # timm applies this dropout functionally before the head
        found.append(f"drop_rate={model.drop_rate}")
    for path, module in model.named_modules():
        if path == head or path.startswith(head + "."):
            continue
        if not module.training:
            continue
        if isinstance(module, STOCHASTIC) and getattr(module, "p", 0) > 0:
            found.append(f"{path} (dropout)")
        elif type(module).__name__ == "DropPath" and getattr(module, "drop_prob", 0) > 0:
            found.append(f"{path} (drop-path)")
        elif isinstance(module, BATCH_STATISTICS) and module.track_running_stats:
            found.append(f"{path} (normalization in training mode)")
    return found


def plan(
    model: nn.Module,
    head: tuple[str, ...],
    deterministic_data: bool,
    setting: str,
    world_size: int = 1,
    random_batches: tuple[str, ...] = (),
) -> tuple[bool, str]:
    """Can this epoch train on cached features? (yes, why) for a head-only stage; (False, "") otherwise.

    Call it with the model in the mode the epoch trains in (frozen norms already in eval).
    `random_batches` says why batches change on the device (random erasing, mixup), if they do.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if len(head) != 1 or not trainable or any(not n.startswith(head[0] + ".") for n in trainable):
        return False, ""  # not a head-only stage
    if setting == "off":
        return False, "train.cache_features is off"
    if not deterministic_data:
        return False, "training augmentation is random, so every epoch sees other images"
    if random_batches:
        return False, "; ".join(random_batches)
    if world_size > 1:
        return False, "distributed runs train uncached"
    random_parts = _random_modules(model, head[0])
    if random_parts:
        return False, "the frozen body is not deterministic: " + ", ".join(random_parts[:3])
    return True, f"only the head ({head[0]}) trains and its input is fixed"


def cache_key(model: nn.Module, head: str, parts: dict[str, Any]) -> str:
    """A digest of every tensor outside the head plus everything that shapes the inputs."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(head + "."):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def _features(
    model: nn.Module,
    head_module: nn.Module,
    batches: Any,
    prepare: Callable,
    autocast: Callable,
    size: int,
    folder: Path | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    captured: list[torch.Tensor] = []
    handle = head_module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    store: torch.Tensor | None = None
    labels = torch.empty(size, dtype=torch.int64)  # reshaped at the first batch: multi-hot rows with data.multi_label
    where = "memory"
    offset = 0
    try:
        for x, y in batches:
            x, y = prepare(x, y)
            captured.clear()
            with autocast():
                out = model(x)
            feats = captured[-1].float()
            if store is None:  # the first batch: check that the head's output is the model's output
                with autocast():
                    again = head_module(captured[-1])
                if not torch.allclose(again.float(), out.float(), rtol=1e-4, atol=1e-5):
                    raise _NotCacheable("the model's output is not its head's output")
                shape = (size, *feats.shape[1:])
                nbytes = int(np.prod(shape)) * 4
                if folder is not None and nbytes > DISK_THRESHOLD_BYTES:
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"{name}.f32"
                    store = torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))
                    where = str(path)
                else:
                    store = torch.empty(shape, dtype=torch.float32)
                labels = torch.empty((size, *y.shape[1:]), dtype=y.dtype)
            n = feats.shape[0]
            store[offset : offset + n] = feats.cpu()
            labels[offset : offset + n] = y.cpu()
            offset += n
    finally:
        handle.remove()
    if store is None or offset != size:
        raise _NotCacheable(f"expected {size} items, saw {offset}")
    return store, labels, where


class _NotCacheable(Exception):
    pass


def build_cache(
    model: nn.Module,
    head: str,
    key: str,
    train_batches: Any,
    train_size: int,
    val_batches: Any,
    val_size: int,
    prepare: Callable,
    autocast: Callable,
    folder: Path | None,
) -> FeatureCache | str:
    """Run the frozen body once over both sets (dataset order); the cache, or why it cannot be built."""
    import time

    start = time.perf_counter()
    head_module = model.get_submodule(head)
    try:
        train, train_labels, where = _features(
            model, head_module, train_batches, prepare, autocast, train_size, folder, f"{key}-train"
        )
        with evaluating(model):
            val, val_labels, _ = _features(
                model, head_module, val_batches, prepare, autocast, val_size, folder, f"{key}-val"
            )
    except _NotCacheable as exc:
        return str(exc)
    return FeatureCache(
        key=key,
        head=head,
        train=train,
        train_labels=train_labels,
        val=val,
        val_labels=val_labels,
        seconds=time.perf_counter() - start,
        where=where,
    )
