"""Checks that need more than the schema: the training settings against the libraries that take
them, and the data against the model. `surgery validate` runs every one of them, and `surgery run`
the same functions, so a spec that validates never stops `run` on a mistake in it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ..data import DataBundle
    from ..model.builder import Built
    from ..spec import Spec


def data_for(spec: Spec, built: Built, world_size: int = 1) -> DataBundle:
    """The spec's data for the built model, checked against it.

    Raises:
        SpecError: the data's classes do not match ``model.num_classes``, the validation set is
            empty, or a training batch would hold a single image while BatchNorm trains.
    """
    from ..data import build_data

    config = dict(built.data_config)
    channels = built.input_size[0]
    if channels not in (1, 3):
        raise spec.error(
            ("model", "in_chans"),
            f"the image datasets hold 1 (gray) or 3 (RGB) channels, not {channels}",
            found=str(channels),
            expected="in_chans 1 or 3 for training on images",
            hint="other channel counts are for models fed by your own code (surgery.build)",
        )
    config["input_size"] = (channels, spec.data.image_size, spec.data.image_size)
    data = build_data(spec, config)  # transforms included: a bad randaugment string fails here
    if len(data.classes) != built.num_classes:
        said = "model.num_classes is not set, so the model keeps" if spec.model.num_classes is None else "the model has"
        raise spec.error(
            ("model", "num_classes"),
            f"{said} {built.num_classes} outputs but the data has {len(data.classes)} classes",
            found=str(spec.model.num_classes),
            expected=f"num_classes: {len(data.classes)}",
        )
    if len(data.val) == 0:
        raise spec.error(
            ("data", "val_split"),
            "the validation set is empty",
            found=str(spec.data.val_split),
            expected="a val_split above 0, or a dataset with its own validation split",
        )
    _check_batch(spec, built, len(data.train), world_size)
    return data


def balance_warnings(spec: Spec, data: DataBundle) -> list[str]:
    """`data.balance` weighs classes by their training counts: a class without training images is
    never drawn and weighs 0 (legal, e.g. in a smoke run on a tiny subset, but worth a word)."""
    if spec.data.balance == "none":
        return []
    from ..data import train_counts

    counts = train_counts(data.train, len(data.classes))
    empty = [c for c, n in zip(data.classes, counts) if n == 0]
    if not empty:
        return []
    file, line, _ = spec.source.locate(("data", "balance"))
    shown = ", ".join(repr(c) for c in empty[:5]) + (f" ({len(empty)} in all)" if len(empty) > 5 else "")
    return [
        f"{file or '<spec>'}" + (f":{line}" if line else "") + f": data.balance: {len(empty)} class(es) have "
        f"no training images ({shown}): balance: {spec.data.balance} never draws them / gives them weight 0"
    ]


def _check_batch(spec: Spec, built: Built, train_size: int, world_size: int) -> None:
    """BatchNorm cannot train on a batch of one image (one value per channel past the last pooling)."""
    from torch import nn

    batch = spec.train.batch_size
    # full batches only, unless the whole training set is smaller than one global batch
    per_process = batch if train_size > batch * world_size else math.ceil(train_size / world_size)
    if per_process >= 2 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.model.modules()):
        return
    if batch < 2:
        raise spec.error(
            ("train", "batch_size"),
            "a training batch of one image cannot train BatchNorm layers",
            found=str(batch),
            expected="train.batch_size: 2 or more",
        )
    key = ("data", "subset", "train") if spec.data.subset.train is not None else ("data",)
    raise spec.error(
        key,
        f"the training set has {train_size} image(s): a batch of one cannot train BatchNorm layers",
        found=f"{train_size} training image(s)" + (f" over {world_size} processes" if world_size > 1 else ""),
        expected=f"at least {2 * world_size} training images",
    )


def check_compile(spec: Spec) -> None:
    """``train.compile``: true, false, auto, or the name of a backend torch.compile knows."""
    backend = spec.train.compile
    if not isinstance(backend, str) or backend == "auto":
        return
    import torch._dynamo

    known = [b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in b]
    if backend not in known:
        from ..errors import did_you_mean

        raise spec.error(
            ("train", "compile"),
            f"torch.compile has no backend {backend!r}",
            found=repr(backend),
            expected="true (inductor), false, auto, or one of " + ", ".join(known),
            hint=did_you_mean(backend, known),
        )


def check_training(spec: Spec, built: Built) -> tuple[str, ...]:
    """Every check of the training settings that can run before training; returns warnings.

    Raises:
        SpecError: an unknown optimizer (with did-you-mean), settings it does not take, data that
            does not fit the model (see `data_for`).
    """
    from .optim import check_optimizer
    from .regularize import distill_path
    from .runtime import resolve_device

    check_optimizer(spec.train, spec=spec)
    check_compile(spec)
    distill_path(spec, built)  # train.regularize.distill.at names a module that runs
    data = data_for(spec, built)
    warnings: list[str] = balance_warnings(spec, data)
    batches = max(len(data.train) // spec.train.batch_size, 1)
    if spec.train.limit_batches:
        batches = min(batches, spec.train.limit_batches)
    if spec.train.accumulate > batches:
        file, line, _ = spec.source.locate(("train", "accumulate"))
        warnings.append(
            f"{file or '<spec>'}" + (f":{line}" if line else "") + f": train.accumulate: "
            f"{spec.train.accumulate} batches per optimizer step, but an epoch has {batches}: "
            "the optimizer steps once per epoch, on fewer batches than asked"
        )

    def note(problem: str, **kw: str) -> UserError:
        return spec.error(("train", "device"), problem, **kw)

    try:
        resolve_device(spec.train.device, note)
    except UserError as err:  # a GPU spec validated on a laptop: `run` there needs --device
        warnings.append(
            f"{err.location}: train.device: {err.problem}; `surgery run` on this machine needs "
            "--device cpu (or train.device: auto)"
        )
    return tuple(warnings)
