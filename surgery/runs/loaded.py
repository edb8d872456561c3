"""A trained run rebuilt for inference: `Run.load` -> `LoadedRun` (this module imports torch).

The model is rebuilt from the run's spec.yaml with its weight source switched off, then the
run's own weight file is loaded strictly: every tensor of the rebuilt model present with its
shape, and nothing else. A file of another model (another head, no inserted modules) is an
error naming what differs, never a model with a random head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch
from PIL import Image
from torch import nn

from ..errors import Origin, UsageError, describe_exception
from .layout import SPEC, WEIGHT_CHOICES

if TYPE_CHECKING:
    from ..model.builder import Built
    from ..spec import Spec


class TrainedRun(Protocol):
    """What loading needs of a run: `reader.Run` is one (typed here without importing the reader,
    which imports this module when `Run.load` is called)."""

    path: Path

    def file(self, name: str) -> Path: ...

    def require_trained(self, weights: str | None = None) -> tuple[Path, str | None]: ...

    def require_classes(self, num_classes: int) -> list[str]: ...


# the spec's weight source is replaced by the run's own weights: none of these may touch them
REBUILD_OVERRIDES = (
    "model.pretrained=false",
    "model.key_map=null",
    "model.checkpoint_key=null",
    "model.reset_head=false",
    "train.regularize={}",  # training terms toward the pretrained weights: nothing to do with inference
)
_SHOWN = 5  # keys named per kind of difference


@dataclass
class LoadedRun:
    """A trained run, rebuilt and ready for inference.

    model: the surgered model in eval mode on `device`. weights: the file it was loaded from.
    note: a line to show the user when the weights are not the run's final ones.
    data_config: the backbone's timm-style config, `input_size` set to the run's image size.
    """

    run_dir: Path
    spec: Spec
    built: Built
    model: nn.Module
    classes: list[str]
    data_config: dict[str, Any]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Path
    device: torch.device
    note: str | None = None
    run: TrainedRun | None = field(default=None, repr=False)
    _transform: Callable[[Image.Image], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> uint8 CHW tensor, exactly as the run's validation saw its images."""
        from ..data import eval_transform

        if self._transform is None:
            self._transform = eval_transform(self.data_config, self.image_size)
        return self._transform

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (from `transform`) -> the normalised float input the model takes, on `device`."""
        from ..data import normalize

        return normalize(images.to(self.device), self.mean, self.std)

    @property
    def weights_kind(self) -> str:
        """final, best or ema; the file's path in the run for a file of no choice."""
        relative = self.weights.relative_to(self.run_dir).as_posix()
        return next((k for k, v in WEIGHT_CHOICES.items() if v == relative), relative)


def load(run: TrainedRun, device: Any = None, weights: str | None = None) -> LoadedRun:
    """`Run.load`: see there."""
    from ..data import normalization
    from ..model.adapters import merge_adapters
    from ..model.builder import build
    from ..spec import load_spec
    from ..train.runtime import device_for
    from .writer import load_safetensors

    path, note = run.require_trained(weights)
    spec = load_spec(run.file(SPEC), REBUILD_OVERRIDES)
    target = device_for(spec, None if device is None else str(device))  # None: the run's recorded train.device
    try:
        state = load_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable weight file is the same problem for the user
        raise UsageError(
            f"the weights cannot be read: {describe_exception(exc, 200)}",
            origin=Origin.path(run.path),
            found=str(path),
            expected="an intact safetensors file written by `surgery run`",
            hint="re-run or resume the training that wrote it",
        ) from None
    built = build(spec)  # the architecture only: pretrained is off, the weights come next, strictly
    load_strict(built.model, state, path, run.path)
    # LoRA written into the weights: the backbone's own layers, the very tensors the adapted layers computed
    merge_adapters(built.model)
    model = built.model.to(target).eval()
    size = spec.data.image_size
    config = dict(built.data_config)
    config["input_size"] = (built.input_size[0], size, size)
    mean, std = normalization(config)
    return LoadedRun(
        run_dir=run.path,
        spec=spec,
        built=built,
        model=model,
        classes=run.require_classes(built.num_classes),
        data_config=config,
        image_size=size,
        mean=mean,
        std=std,
        weights=path,
        device=target,
        note=note,
        run=run,
    )


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, run_dir: Path) -> None:
    """Load a run's own weights: every tensor of `model` present with its shape, no other.

    Raises:
        UsageError: the file is not this spec's model, naming the first few missing, unexpected
            and mis-shaped tensors and how many of each.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} in the file, {list(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                parts.append(
                    f"{len(keys)} {label}: " + ", ".join(keys[:_SHOWN]) + (" ..." if len(keys) > _SHOWN else "")
                )
        raise UsageError(
            f"{path.name} does not hold the weights of the model its spec.yaml builds "
            f"({'; '.join(p.split(':')[0] for p in parts)} tensors)",
            origin=Origin.path(path),
            found="; ".join(parts),
            expected=f"exactly the {len(expected)} tensors of the model {run_dir / SPEC} describes",
            hint="the file was replaced or belongs to another run: "
            "restore the run's own weights, or re-run the training",
        ) from None
    model.load_state_dict(dict(state), strict=True)


__all__ = ["LoadedRun", "load", "load_strict", "REBUILD_OVERRIDES"]
