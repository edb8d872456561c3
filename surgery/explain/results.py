"""What an explanation is, shared by the command and its figure: the CAM methods, the layers a CAM
is taken at, and everything one image's figure and predictions.json entry need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import ModuleAttention

# --method name -> the pytorch_grad_cam class; progress: the method prints a tqdm bar per image
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}


@dataclass(frozen=True)
class Layers:
    """The layers a CAM is taken at: module paths, the label shown, and how to read their maps."""

    paths: tuple[str, ...]
    label: str
    channels_last: bool = False
    note: str | None = None


@dataclass
class Explained:
    """Everything one image's figure and its predictions.json entry need."""

    path: Path
    image: torch.Tensor  # uint8 C x H x W, the model's input before normalisation
    cam: Any  # float32 H x W in [0, 1] (numpy), the surgered model's CAM
    predicted: int
    confidence: float
    explained: int
    attention: dict[str, ModuleAttention]
    backbone_cam: Any = None  # the same, without the inserted modules (None when there are none)
    backbone_predicted: int | None = None
    backbone_confidence: float | None = None
    backbone_note: str | None = None  # why there is no backbone CAM, when the run has inserted modules
    png: str = ""
