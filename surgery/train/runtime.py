"""Where and how the model runs: device, precision, memory format, torch.compile, seeding."""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn

from ..errors import Origin, UsageError, UserError
from ..spec import Spec


@dataclass(frozen=True)
class Runtime:
    """Decisions made once per run from `spec.train` and the machine.

    precision: 'fp32', 'bf16' or 'fp16'; fp16 uses a GradScaler.
    """

    device: torch.device
    precision: str
    channels_last: bool
    compile: bool | str
    pin_memory: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        compiled = (
            f", torch.compile({self.compile if isinstance(self.compile, str) else 'inductor'})" if self.compile else ""
        )
        return f"{self.device} {self.precision}{', channels_last' if self.channels_last else ''}{compiled}"


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def _mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(requested: str, error: Callable[..., UserError]) -> torch.device:
    """The device a run or a command uses: auto picks CUDA, then MPS, then the CPU; an explicit
    device must exist on this machine. Under torchrun, a bare ``cuda`` is the process's own GPU
    (LOCAL_RANK).

    Args:
        requested: auto, cpu, cuda, cuda:N or mps.
        error: makes the error for a device that cannot be used, located where the value came
            from: ``error(problem, found=..., expected=..., hint=...)``.
    """
    requested = str(requested)
    if not _DEVICE.match(requested):
        raise error("this is not a device", found=repr(requested), expected=DEVICES)
    requested = choose_device(None, requested, cuda=torch.cuda.is_available(), mps=requested == "auto" and _mps())
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(
            "CUDA is not available on this machine",
            found=requested,
            expected="auto or cpu",
            hint="--device cpu, or --set train.device=auto",
        )
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise error(
            f"there is no {device}", found=requested, expected=f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type == "mps" and not _mps():
        raise error("MPS is not available on this machine", found=requested, expected="auto or cpu")
    return device


def choose_device(flag: str | None, spec_device: str, *, cuda: bool, mps: bool = False) -> str:
    """The device every command uses (run, sweep, lr-find, predict, evaluate, explain): ``--device``
    when given, else the spec's ``train.device`` (a trained run's: its recorded spec.yaml's), with
    ``auto`` made cuda when CUDA is available, else mps when MPS is, else cpu. Pure: the caller
    says what this machine has.

    Example:
        >>> choose_device(None, "auto", cuda=False)
        'cpu'
        >>> choose_device("cpu", "cuda:1", cuda=True)
        'cpu'
    """
    requested = flag or spec_device
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    return requested


def device_for(spec: Spec, flag: str | None = None) -> torch.device:
    """The device for `spec`: `choose_device`'s, checked on this machine; a device that cannot be
    used is an error located at --device, or at the spec's ``train.device`` when it came from there."""
    if flag:

        def error(problem: str, **kw: Any) -> UserError:
            return UsageError(problem, origin=Origin.flag("--device", flag), **kw)
    else:

        def error(problem: str, **kw: Any) -> UserError:
            return spec.error(("train", "device"), problem, **kw)

    return resolve_device(flag or spec.train.device, error)


def make_runtime(spec: Spec, device_override: str | None = None) -> Runtime:
    """The run's runtime before any measurement: explicit settings as given; ``precision: auto``
    by its rule (bf16 on CUDA, fp16 where bf16 is missing, fp32 elsewhere); ``channels_last:
    auto``, ``precision: fastest`` and ``compile: auto`` provisionally (channels_last on, the
    auto precision, not compiled) until `autotune` times them (`prepare` does, for a run)."""
    train = spec.train
    device = device_for(spec, device_override)
    precision = train.precision
    if precision in ("auto", "fastest"):
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # On CPUs bf16 autocast helps some models and hurts others (2-core Xeon with AVX512-BF16,
            # torch 2.14, 64 px: resnet18 + CBAM 1.37x fp32's speed, EfficientNet-Lite0 0.6x, whose
            # depthwise convolutions have no fast bf16 kernel here), so `auto` stays fp32 there;
            # `precision: fastest` lets the trial (autotune.py) choose bf16 where it measures faster.
            precision = "fp32"
    return Runtime(
        device=device,
        precision=precision,
        channels_last=train.channels_last is not False,  # True, or "auto" provisionally
        compile=False if train.compile == "auto" else train.compile,
        pin_memory=device.type == "cuda",
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG this process draws from: Python, numpy, torch CPU, CUDA, MPS.

    Plain data and tensors only, so a checkpoint holding it loads with ``weights_only=True``.
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and _mps():
        torch.mps.set_rng_state(state["mps"])


class Compiled:
    """torch.compile that never trains a stale frame.

    Dynamo can reuse a graph compiled while a group was frozen and keep it frozen after
    `requires_grad` flips (pytorch issue 139476). The trainable set changes only at unfreeze
    epochs, so the model is recompiled exactly then, not every epoch.
    """

    def __init__(self, model: nn.Module, backend: bool | str) -> None:
        self.model = model
        self.backend = "inductor" if backend is True else str(backend)
        self._key: tuple | None = None
        self._fn: Callable | None = None
        self.compilations = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # dynamo guards on .training itself (train and eval graphs are cached side by side)
        key = tuple(p.requires_grad for p in self.model.parameters())
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(self.model, backend=self.backend)
            self._key = key
            self.compilations += 1
        return self._fn(x)
