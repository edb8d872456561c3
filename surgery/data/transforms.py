"""Transforms: PIL images to uint8 tensors (eval geometry, `data.augment`, RandAugment), and
`normalize`, which runs on the device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import torch
from PIL import Image
from torch import Tensor

from ..model.backbones import IMAGENET_MEAN, IMAGENET_STD
from ..spec import Spec

# ImageNet's 0.08 lower bound assumes large photos and long schedules; fine-tuning sets are
# small, runs are short and images often tiny (8% of an 8x8 digit is two pixels).
STANDARD_SCALE = (0.25, 1.0)


def _interpolation(data_config: Mapping) -> str:
    mode = data_config.get("interpolation") or "bilinear"
    return "bilinear" if mode == "random" else mode


class _EvalGeometry:
    """PIL image -> RGB PIL image of image_size x image_size, the way inference sees it.

    Images whose shorter side is no larger than the input (8x8 digits, 28px MNIST, 32px
    CIFAR) are resized whole: for them crop_pct, an ImageNet convention for large photos of a
    centred object, would only cut off real content. Larger images follow the config: resize
    to image_size/crop_pct and crop (crop_mode center, squash or border, as timm does).
    """

    def __init__(self, data_config: Mapping, image_size: int) -> None:
        from timm.data.transforms import MaybePILToTensor, str_to_pil_interp
        from timm.data.transforms_factory import transforms_imagenet_eval

        self.size = image_size
        self.resample = str_to_pil_interp(_interpolation(data_config))
        timm_eval = transforms_imagenet_eval(
            image_size,
            crop_pct=data_config.get("crop_pct"),
            crop_mode=data_config.get("crop_mode"),
            interpolation=_interpolation(data_config),
            mean=tuple(data_config.get("mean", IMAGENET_MEAN)),
            std=tuple(data_config.get("std", IMAGENET_STD)),
            use_prefetcher=True,  # stops at a uint8 tensor, which we add ourselves
        )
        self.large = [t for t in timm_eval.transforms if not isinstance(t, MaybePILToTensor)]
        self.mode = image_mode(data_config)

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert(self.mode)
        if min(image.size) <= self.size:
            return image.resize((self.size, self.size), self.resample)
        for step in self.large:
            image = step(image)
        return image


class _Compose:
    """A picklable chain of PIL steps ending in a uint8 CHW tensor."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Image.Image) -> Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        for step in self.steps:
            image = step(image)
        return pil_to_tensor(image)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(s) for s in self.steps) + ")"


def image_mode(data_config: Mapping) -> str:
    """'L' for a model that reads one channel (model.in_chans: 1), else 'RGB'. A gray image stays
    exactly itself: PIL's RGB -> L of (v, v, v) is v."""
    return "L" if tuple(data_config.get("input_size", (3,)))[0] == 1 else "RGB"


class _ToRGB:
    """To the model's image mode: RGB, or L for one input channel."""

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert(self.mode)


def eval_transform(data_config: Mapping, image_size: int) -> Callable[[Image.Image], Tensor]:
    """The deterministic transform for validation and prediction.

    Args:
        data_config: a timm-style data config (`interpolation`, `crop_pct`, `crop_mode`, ...).
        image_size: the side of the square model input.

    Returns:
        A callable PIL image -> uint8 tensor 3 x image_size x image_size. Gray and RGBA
        images become RGB. Images whose shorter side is at most `image_size` are resized
        whole; larger ones are resized to ``image_size / crop_pct`` and cropped per
        `crop_mode`, as timm evaluates.

    Example:
        >>> t = eval_transform({"crop_pct": 0.875, "interpolation": "bilinear"}, 32)
        >>> t(Image.new("L", (100, 80))).shape
        torch.Size([3, 32, 32])
    """
    return _Compose([_EvalGeometry(data_config, image_size)])


CORNER_VIEWS = ("crop top-left", "crop top-right", "crop bottom-left", "crop bottom-right")


class TTAViews:
    """PIL image -> (views V x C x H x W uint8, their names) for test-time augmentation.

    Every image gets its eval view ("original") and that view mirrored ("hflip"). An image the
    eval transform crops (larger than the input, crop_mode center or squash, crop_pct below 1)
    also gets the four corner crops of the same resized image, torchvision's `five_crop` less
    the centre (which is the original). Images resized whole (digits, MNIST, CIFAR at their own
    size) have nothing to crop, so they get two views.
    """

    def __init__(self, data_config: Mapping, image_size: int) -> None:
        import torchvision.transforms as T

        self.geometry = _EvalGeometry(data_config, image_size)
        steps = self.geometry.large
        # the resize before a plain centre crop; timm's border mode pads instead, and is left alone
        self.before_crop = steps[:-1] if steps and type(steps[-1]) is T.CenterCrop else None

    def __call__(self, image: Image.Image) -> tuple[Tensor, list[str]]:
        from torchvision.transforms.functional import five_crop, hflip, pil_to_tensor

        size = self.geometry.size
        original = self.geometry(image)
        views, names = [original, hflip(original)], ["original", "hflip"]
        image = image.convert(self.geometry.mode)
        if self.before_crop is not None and min(image.size) > size:
            resized = image
            for step in self.before_crop:
                resized = step(resized)
            if resized.size != (size, size):
                views.extend(five_crop(resized, [size, size])[:4])
                names.extend(CORNER_VIEWS)
        return torch.stack([pil_to_tensor(v) for v in views]), names


def train_transform(spec: Spec, data_config: Mapping) -> tuple[Callable[[Image.Image], Tensor], bool]:
    """The train transform for `data.augment`, and whether it is deterministic."""
    import torchvision.transforms as T
    from timm.data.transforms import RandomResizedCropAndInterpolation

    size = spec.data.image_size
    augment = spec.data.augment
    where = ("data", "augment")
    if augment.preset == "none":
        return eval_transform(data_config, size), True
    if augment.scale is not None and augment.crop_given and not augment.crop:
        raise spec.error(
            where + ("scale",),
            "scale sets the range of the random crop, which is off",
            found=f"crop: false, scale: {list(augment.scale)}",
            expected="crop: true (or leave crop out) with scale, or no scale",
            hint="remove `crop: false` to crop randomly",
        )
    scale = augment.scale if augment.scale is not None else STANDARD_SCALE
    if scale[0] > scale[1]:
        raise spec.error(
            where + ("scale",),
            "scale is a [min, max] range of the crop area",
            found=str(list(scale)),
            expected="min <= max, e.g. [0.25, 1.0]",
        )
    interpolation = _interpolation(data_config)
    steps: list[Callable] = [_ToRGB(image_mode(data_config))]
    if augment.crop:
        steps.append(RandomResizedCropAndInterpolation(size, scale=scale, interpolation=interpolation))
    else:
        steps.append(_EvalGeometry(data_config, size))
    if augment.hflip > 0:
        steps.append(T.RandomHorizontalFlip(augment.hflip))
    if augment.vflip > 0:
        steps.append(T.RandomVerticalFlip(augment.vflip))
    if augment.rotation > 0:
        steps.append(T.RandomRotation(augment.rotation))
    if augment.randaugment:
        steps.append(_randaugment(spec, augment.randaugment, size, data_config))
    if augment.color_jitter > 0:
        steps.append(T.ColorJitter(*(augment.color_jitter,) * 3))
    deterministic = len(steps) == 2 and isinstance(steps[1], _EvalGeometry)
    return _Compose(steps), deterministic


def _randaugment(spec: Spec, text: str, size: int, data_config: Mapping) -> Callable:
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    mean = data_config.get("mean", IMAGENET_MEAN)
    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "interpolation": str_to_pil_interp(_interpolation(data_config)),
    }
    error = spec.error(
        ("data", "augment", "randaugment"),
        "this is not a RandAugment config string",
        found=repr(text),
        expected="'rand' followed by -m<magnitude>, -n<layers>, -mstd<std>, "
        "-p<prob>, -inc<0|1>, e.g. 'rand-m9-mstd0.5'",
    )
    head, *sections = text.split("-")
    # timm skips a section it cannot read (no digits) without a word: refuse it here instead
    if head != "rand" or not all(re.fullmatch(r"(mstd|mmax|inc|m|n|p)[0-9]+(\.[0-9]+)?|t\w+", s) for s in sections):
        raise error
    try:
        return rand_augment_transform(text, hparams)
    except (AssertionError, ValueError, KeyError, IndexError):
        raise error from None


def normalize(batch: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images NCHW -> float32 ``(x / 255 - mean) / std``, on the batch's device.

    The memory format is kept (a channels_last batch stays channels_last).

    Example:
        >>> x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
        >>> normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).unique().tolist()
        [1.0]
    """
    scale, shift = _affine(tuple(float(m) for m in mean), tuple(float(s) for s in std), batch.device)
    # .float() and the in-place ops both preserve the memory format
    return batch.float().mul_(scale).sub_(shift)


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # cached: building them per batch would copy from pageable host memory and sync the stream
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift
