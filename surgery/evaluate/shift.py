"""A shifted test set: a run's test split (validation when it has none) under fixed, seeded corruptions.

    surgery evaluate RUN_DIR --shift rotate,blur,noise   (or --shift all)

Each corruption acts on the image exactly as the model would see it (the run's eval transform
applied: uint8, C x H x W, at the run's image size), before normalisation, through torchvision's
transforms v2 functions. Severities are fixed (one level each, stated in `CORRUPTIONS`), and every
random draw comes from a generator seeded by (seed, corruption, image position), so the shifted
set is the same image for image on every machine and every call.

    rotate  a rotation by 15 to 30 degrees, either way (angle and side drawn per image), bilinear,
            the corners filled black
    blur    a Gaussian blur of sigma = image side / 32 pixels (1 px at 32 px, 2 px at 64 px),
            kernel 2 * ceil(3 sigma) + 1
    noise   additive Gaussian noise of standard deviation 0.1 of the full range (25.5 levels of
            255) on every pixel and channel, rounded and clipped to 0..255

What is written, atomically, in ``RUN_DIR/eval/<split>-shift/shift.json``: the clean accuracy on the
same images, the accuracy under each corruption, their mean, and the drop from clean to the mean.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import Origin, UsageError
from ..files import write_folder
from ..runs import layout, open_run

SHIFT_FILE = layout.EVAL_SHIFT
DEFAULT_SEED = 0


def _generator(seed: int, corruption: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + corruption) * 1_000_000_007 + index)


def _rotate(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    angle = 15.0 + 15.0 * float(torch.rand((), generator=g))
    side = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
    return TF.rotate(image, side * angle, interpolation=InterpolationMode.BILINEAR, fill=0)


def _blur(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    sigma = blur_sigma(image.shape[-1])
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def blur_sigma(side: int) -> float:
    """The blur's sigma in pixels for an image `side` pixels wide."""
    return side / 32.0


NOISE_STD = 0.1  # of the full range


def _noise(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=g) * (NOISE_STD * 255.0)
    return (image.float() + noise).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Corruption:
    name: str
    describe: str
    apply: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("rotate", "rotation by 15-30 degrees either way, bilinear, black corners", _rotate),
        Corruption("blur", "Gaussian blur, sigma = image side / 32 px", _blur),
        Corruption("noise", f"additive Gaussian noise, std {NOISE_STD:g} of the range", _noise),
    )
}


def corrupt(name: str, image: torch.Tensor, index: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Image `index` of a set (uint8, C x H x W) under corruption `name`: the same every call."""
    position = list(CORRUPTIONS).index(name)
    return CORRUPTIONS[name].apply(image, _generator(seed, position, index))


def parse_shift(value: str) -> list[str]:
    """`--shift rotate,blur,noise` (or `all`) -> the corruption names, in the order given.

    Raises:
        UsageError: an unknown or repeated name, located at --shift.
    """
    names = list(CORRUPTIONS) if value.strip() == "all" else [v.strip() for v in value.split(",")]
    for name in names:
        if name not in CORRUPTIONS:
            from ..errors import did_you_mean

            raise UsageError(
                f"--shift names an unknown corruption {name!r}",
                origin=Origin.flag("--shift", value),
                found=repr(name),
                expected="a comma-separated list of " + ", ".join(CORRUPTIONS) + ", or all",
                hint=did_you_mean(name, list(CORRUPTIONS)),
            )
    if len(set(names)) != len(names):
        raise UsageError(
            "--shift names a corruption twice",
            origin=Origin.flag("--shift", value),
            found=value,
            expected="each corruption once",
        )
    return names


@torch.inference_mode()
def _accuracy(run: Any, images: list[torch.Tensor], labels: np.ndarray, batch_size: int) -> float:
    right = 0
    for i in range(0, len(images), batch_size):
        x = torch.stack(images[i : i + batch_size])
        predicted = run.model(run.preprocess(x)).float().argmax(1).cpu().numpy()
        right += int((predicted == labels[i : i + batch_size]).sum())
    return right / max(len(images), 1)


def shift_evaluate(
    run_dir: str | Path,
    names: Sequence[str],
    *,
    split: str | None = None,
    weights: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    seed: int = DEFAULT_SEED,
    on_note: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score a run on its test split (validation when it has none, or `split`) clean and under each
    corruption; write ``eval/<split>-shift/shift.json`` and return (its content, its folder)."""
    from .command import split_set

    run_dir = Path(run_dir)
    trained = open_run(run_dir)
    trained.require_trained(weights)
    run = trained.load(device, weights)
    if split is None:  # the test split, else the validation split
        record = trained.require_splits() or {}
        split = "test" if record.get("test") else "val"
    evalset = split_set(run, split)
    if on_note:
        on_note(f"shifted set: {len(evalset)} images of the {split} split under {', '.join(names)} (seed {seed})")
    clean = [run.transform(evalset.source_images.load(int(i))) for i in evalset.indices]
    labels = np.asarray(evalset.labels)
    results = {}
    for name in names:
        shifted = [corrupt(name, image, k, seed) for k, image in enumerate(clean)]
        results[name] = {"accuracy": _accuracy(run, shifted, labels, batch_size), "what": CORRUPTIONS[name].describe}
    clean_acc = _accuracy(run, clean, labels, batch_size)
    mean = float(np.mean([r["accuracy"] for r in results.values()]))
    metrics = {
        "split": split,
        "source": evalset.source,
        "used_for_model_selection": evalset.selection,
        "run": run.spec.name,
        "weights": run.weights_kind,
        "images": len(clean),
        "image_size": list(clean[0].shape) if clean else None,
        "seed": seed,
        "clean_accuracy": clean_acc,
        "corruptions": results,
        "mean_accuracy": mean,
        "drop": clean_acc - mean,
    }
    folder = run_dir / layout.EVAL / f"{split}-shift"
    write_folder(folder, {SHIFT_FILE: (json.dumps(metrics, indent=2) + "\n").encode()})
    return metrics, folder


def shift_command(
    run_dir: str | Path,
    shift: str,
    *,
    split: str | None = None,
    data: str | None = None,
    tta: bool = False,
    weights: str | None = None,
    as_json: bool = False,
    batch_size: int = 64,
    device: str | None = None,
) -> int:
    """`surgery evaluate RUN_DIR --shift NAMES [--split test|val]`: print the accuracy per corruption."""
    from rich.markup import escape

    from ..untrusted import Console

    names = parse_shift(shift)
    for flag, value in (("--data", data), ("--tta", tta or None)):
        if value is not None:
            raise UsageError(
                f"--shift scores the run's own split; {flag} does not go with it",
                origin=Origin.flag(flag, value if value is not True else ""),
                expected="--shift with --split test|val (or neither: the test split, else val)",
            )
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    metrics, folder = shift_evaluate(
        run_dir,
        names,
        split=split,
        weights=weights,
        batch_size=batch_size,
        device=device,
        on_note=lambda text: err.print(escape(text)),
    )
    if as_json:
        print(json.dumps({**metrics, "folder": str(folder)}))
        return 0
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{escape(metrics['run'])}: {metrics['images']} images of the {metrics['split']} split")
    out.print(f"clean    {metrics['clean_accuracy']:.4f}")
    for name, r in metrics["corruptions"].items():
        out.print(f"{name:<8} {r['accuracy']:.4f}   {escape(r['what'])}")
    out.print(f"mean     {metrics['mean_accuracy']:.4f}   drop {metrics['drop']:+.4f}")
    err.print(f"wrote {escape(str(folder / SHIFT_FILE))}")
    return 0


__all__ = ["CORRUPTIONS", "SHIFT_FILE", "blur_sigma", "corrupt", "parse_shift", "shift_command", "shift_evaluate"]
