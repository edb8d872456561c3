"""What a run trains with: `prepare` builds model, data, optimizer and loaders once into a `Context`."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import DataBundle, class_weights, make_loader, normalize, pos_weights
from ..model.builder import Built, build
from ..spec import Spec
from .autotune import Candidate, Tuning, candidates, tune
from .cache import FeatureCache
from .checks import check_compile, data_for
from .distributed import DataParallel, Distributed, broadcast_state, convert_sync_bn, setup
from .mixing import BatchAugment, train_criterion
from .optim import build_optimizer
from .regularize import Regularizer, exempt_from_decay, make_regularizer
from .runtime import Compiled, Runtime, make_runtime, seed_everything
from .schedule import EarlyStop, Plateau, Unfreezing, trainable_at

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Everything the epoch functions share, built once by `prepare`.

    The fields that change during a run: `trainable_params` (at each unfreeze) and `features`
    (the head-only cache, set by `features.use_feature_cache`); `plateau`, `unfreeze` and
    `early_stop` hold the schedule's state (what validation decided), kept in the checkpoint.
    """

    spec: Spec
    built: Built
    data: DataBundle
    runtime: Runtime
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plateau: Plateau
    unfreeze: Unfreezing
    early_stop: EarlyStop
    ema: Any
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    batch_augment: BatchAugment | None = None  # erasing and mixup on the device (None: neither)
    class_weights: torch.Tensor | None = None  # data.balance: loss
    trainable_params: list[nn.Parameter] = field(default_factory=list)
    dist: Distributed = field(default_factory=Distributed)
    features: FeatureCache | None = None  # head-only stages: the frozen body's outputs, computed once
    tuning: Tuning | None = None  # how channels_last / precision / compile were decided (autotune.py)
    regularizer: Regularizer | None = None  # train.regularize: its w0, teacher and hooks

    @property
    def steps(self) -> int:
        """Training batches per epoch on each process (``train.limit_batches`` applied)."""
        limit = self.spec.train.limit_batches
        return min(len(self.train_loader), limit) if limit else len(self.train_loader)


def _place_model(spec: Spec, built: Built, runtime: Runtime, env: Distributed) -> nn.Module:
    model = built.model
    if env.enabled and spec.train.sync_bn:
        if runtime.device.type == "cuda":
            model = convert_sync_bn(model)  # same parameter objects: groups still hold
        elif env.is_main:
            log.warning(
                "train.sync_bn: SyncBatchNorm needs CUDA; on the CPU each process keeps its own "
                "BatchNorm statistics, averaged at the end of every epoch"
            )
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    broadcast_state(model, env)
    return model


def _optimizer(spec: Spec, built: Built, model: nn.Module, runtime: Runtime) -> tuple[Any, Regularizer | None]:
    """The optimizer (the pretrained tensors out of weight decay under L2-SP) and the regulariser,
    taken from the step-0 model: a resumed run restores its checkpoint after this."""
    no_decay = exempt_from_decay(spec, built)
    optimizer = build_optimizer(
        model, built.groups, spec.train, device_type=runtime.device.type, spec=spec, no_decay=no_decay
    )
    return optimizer, make_regularizer(spec, built, model)


def prepare(
    spec: Spec,
    *,
    device: str | None = None,
    runs_root: Path | None = None,
    env: Distributed | None = None,
    settings: Candidate | str | None = None,
) -> Context:
    """Build model, data, optimizer and friends for a run (no files written).

    Under torchrun (or with `env`), joins the process group, shards both loaders and wraps the
    model for data parallelism; otherwise everything runs in this process. Settings left to
    measurement (``channels_last: auto``, ``precision: fastest``, ``compile: auto``) are timed
    here (`autotune.tune`), unless `settings` gives them (a resumed run keeps its own; "provisional":
    a run resumed from before tuning.json keeps what those settings meant then).
    """
    check_compile(spec)
    runtime = make_runtime(spec, device)
    env = env if env is not None else setup(runtime.device)
    # per-process streams for dropout and the like; rank 0 matches a single-process run
    seed_everything(spec.seed + env.rank)
    built = build(spec, runs_root=runs_root)
    data = data_for(spec, built, env.world_size)
    train_loader, val_loader = _loaders(spec, data, runtime, env)
    runtime, tuning = _tune(spec, built, data, runtime, env, (train_loader, val_loader), settings)
    model = _place_model(spec, built, runtime, env)
    optimizer, regularizer = _optimizer(spec, built, model, runtime)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    ema = None
    if spec.train.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=spec.train.ema)
    forward: Callable
    if env.enabled:
        forward = DataParallel(model, env, compile=runtime.compile)
    else:
        forward = Compiled(model, runtime.compile) if runtime.compile else model
    weights = None
    if spec.data.balance == "loss":
        hot = data.train.multi_hot
        # multi-label: BCE's pos_weight (negatives / positives per class) instead of class weights
        weights = torch.as_tensor(
            class_weights(data.train.targets, len(data.classes)) if hot is None else pos_weights(hot),
            dtype=torch.float32,
        )
    criterion = train_criterion(spec, weights).to(runtime.device)
    augment = BatchAugment(spec, len(data.classes), runtime.device, env.rank)
    return Context(
        spec=spec,
        built=built,
        data=data,
        runtime=runtime,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scaler=scaler,
        plateau=Plateau.from_train(spec.train),
        unfreeze=Unfreezing(spec),
        early_stop=EarlyStop(spec),
        ema=ema,
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=criterion,
        batch_augment=augment if augment.active else None,
        class_weights=weights,
        dist=env,
        tuning=tuning,
        regularizer=regularizer,
    )


def _loaders(spec: Spec, data: DataBundle, runtime: Runtime, env: Distributed) -> tuple[Any, Any]:
    """The training and validation loaders of this process."""
    batch = spec.train.batch_size  # per process; the global batch is batch_size x world_size
    loader = dict(
        batch_size=batch,
        seed=spec.seed,
        num_workers=spec.data.num_workers,
        pin_memory=runtime.pin_memory,
        rank=env.rank,
        world_size=env.world_size,
    )
    # a last training batch of one sample would make BatchNorm fail; dropping a partial batch is harmless
    train_loader = make_loader(
        data.train,
        train=True,
        drop_last=len(data.train) > batch * env.world_size,
        balance_targets=data.train.targets if spec.data.balance == "sampler" else None,
        **loader,
    )
    return train_loader, make_loader(data.val, train=False, **loader)


def _tune(
    spec: Spec,
    built: Built,
    data: DataBundle,
    runtime: Runtime,
    env: Distributed,
    loaders: tuple[Any, Any],
    settings: Candidate | str | None,
) -> tuple[Runtime, Tuning]:
    """The runtime with the settings left to measurement decided (`autotune`), and how they were."""
    train, (train_loader, val_loader) = spec.train, loaders
    steps = min(len(train_loader), train.limit_batches or len(train_loader))
    if settings == "provisional":  # a run from before tuning.json: what `auto` meant then
        tuning = Tuning(Candidate(runtime.channels_last, runtime.precision, runtime.compile), "resumed")
    elif settings is not None:
        tuning = Tuning(settings, "resumed")
    else:
        cuda = runtime.device.type == "cuda"
        bf16 = not cuda or torch.cuda.is_bf16_supported()
        cands = candidates(runtime.device.type, train.channels_last, train.precision, train.compile, bf16=bf16)
        if len(cands) == 1:
            tuning = Tuning(cands[0], "explicit")
        else:
            probe = copy.deepcopy(built.model)  # trainable as in the last epoch (usually the longest stage)
            params = dict(probe.named_parameters())
            for g in built.groups:
                for name in g.params:
                    params[name].requires_grad_(trainable_at(g.spec, train.epochs - 1, None))
            tuning = tune(
                probe,
                cands,
                _probe_batch(val_loader, train.batch_size, runtime.device, data),
                lambda m: build_optimizer(m, built.groups, train, device_type=runtime.device.type, spec=spec),
                surgery={"model": spec.raw.get("model"), "surgery": spec.raw.get("surgery")},
                total_steps=train.epochs * steps,
                agree=(lambda t: env.sum_(t.to(env.device)).cpu()) if env.enabled else None,
            )
    chosen = tuning.chosen
    return replace(
        runtime, channels_last=chosen.channels_last, precision=chosen.precision, compile=chosen.compile
    ), tuning


def _probe_batch(val_loader: Any, batch: int, device: torch.device, data: DataBundle) -> torch.Tensor:
    """A real batch of `batch` images (the first validation images, repeated when fewer), normalised
    on `device`; the loader's generator is put back, so the run's data order is untouched."""
    state = val_loader.state_dict()
    images = next(iter(val_loader.epoch(0)))[0]
    val_loader.load_state_dict(state)
    while len(images) < batch:
        images = torch.cat([images, images])
    return normalize(images[:batch].to(device), data.mean, data.std)
