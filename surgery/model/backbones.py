"""Backbones from torchvision and timm, through the libraries' own builders and weight caches."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import describe_exception, did_you_mean, quote_value
from ..spec import Spec, backbone_names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A backbone at the spec's class count, before surgery, and what came with it.

    model: random-initialised architecture (weights are loaded after surgery, by `weights.py`).
    head: module paths of the classifier head(s) in `model`.
    pretrained: the library's state_dict when `pretrained: true`, else None.
    pretrained_from: words for where that state_dict came from (for the load report).
    data_config: timm-style data config (input_size, mean, std, interpolation, crop_pct, crop_mode).
    """

    model: nn.Module
    head: tuple[str, ...]
    data_config: dict[str, Any]
    pretrained: dict[str, torch.Tensor] | None = None
    pretrained_from: str = ""
    num_classes: int = 0
    notes: list[str] = field(default_factory=list)


def _unknown_backbone(spec: Spec, source: str, arch: str) -> Exception:
    names = backbone_names(source)
    return spec.error(
        ("model", "backbone"),
        f"{source} has no model named {arch!r}",
        found=f"{source}:{arch}",
        expected=f"a model name of {source} (`surgery inspect --list {source}` lists {len(names)})",
        hint=did_you_mean(arch, names),
    )


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def with_args(spec: Spec, args: Mapping[str, Any]) -> Spec:
    """The same spec with other `model.args` (to find which of them a failure comes from)."""
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, args=dict(args)))


def culprit_arg(spec: Spec, fails: Callable[[Spec], bool]) -> tuple | None:
    """The key path in `model.args` that a failure of the backbone comes from.

    ("model", "args", key) when that key alone makes `fails` true; ("model", "args") when only the
    combination does; None when the backbone fails without any args too (they are not to blame).
    """
    args = dict(spec.model.args)
    if not args or fails(with_args(spec, {})):
        return None
    for key, value in args.items():
        if fails(with_args(spec, {key: value})):
            return ("model", "args", key)
    return ("model", "args")


def _constructor_error(spec: Spec, exc: Exception, build: Callable[[Spec], Any]) -> Exception:
    detail = describe_exception(exc, 400) if not isinstance(exc, TypeError) else str(exc)
    unknown = _UNEXPECTED.search(str(exc))
    if unknown:  # a key the constructor does not take: the mapping is at fault, the key named
        return spec.error(
            ("model", "args"),
            f"the backbone's constructor rejected its arguments: {detail}",
            found=repr(dict(spec.model.args)),
            expected=f"keyword arguments that {spec.model.backbone} accepts",
            hint=f"remove {unknown.group(1)!r}, or check its spelling against the model's constructor",
        )

    def fails(candidate: Spec) -> bool:
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build(candidate)
        except Exception:  # noqa: BLE001 - any failure counts: the error quoted is the original's
            return True
        return False

    where = culprit_arg(spec, fails) or ("model", "args")
    if len(where) == 3:
        key = where[2]
        return spec.error(
            where,
            f"the backbone's constructor rejected model.args.{key}: {detail}",
            found=f"{key}: {quote_value(spec.model.args[key])}",
            expected=f"a value of {key} that {spec.model.backbone} accepts",
        )
    return spec.error(
        ("model", "args"),
        f"the backbone's constructor rejected its arguments: {detail}",
        found=repr(dict(spec.model.args)),
        expected=f"keyword arguments that {spec.model.backbone} accepts",
    )


def create_backbone(spec: Spec, *, fetch: bool = True) -> Backbone:
    """Build the architecture the spec names and fetch its pretrained weights when asked.

    Args:
        spec: the loaded spec; only `spec.model` is read.
        fetch: False skips `pretrained: true` weights (the caller loads its own state_dict).

    Returns:
        A `Backbone` whose `.model` has `spec.model.num_classes` outputs (the library default when null).

    Raises:
        SpecError: unknown model, rejected constructor arguments, or weights that cannot be had offline.
    """
    if spec.model.source == "torchvision":
        return _torchvision(spec, fetch)
    return _timm(spec, fetch)


def _meta_build(spec: Spec) -> nn.Module:
    # the architecture alone, on the meta device (no memory, no arithmetic), no weights
    import timm
    import torchvision

    kwargs = dict(spec.model.args)
    with torch.device("meta"):
        if spec.model.source == "torchvision":
            if spec.model.num_classes is not None:
                kwargs["num_classes"] = spec.model.num_classes
            return torchvision.models.get_model(spec.model.arch.partition(".")[0], weights=None, **kwargs)
        return timm.create_model(spec.model.arch, pretrained=False, **kwargs)


def _meta_build_fails(spec: Spec) -> bool:
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _meta_build(spec)
    except Exception:  # noqa: BLE001 - any failure
        return True
    return False


# --------------------------------------------------------------------------- torchvision
def _torchvision_weights(spec: Spec, arch: str, tag: str | None):
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    if tag is None:
        return enum.DEFAULT
    try:
        return enum[tag]
    except KeyError:
        members = [m.name for m in enum]
        raise spec.error(
            ("model", "backbone"),
            f"torchvision has no weights {tag!r} for {arch}",
            found=tag,
            expected="one of " + ", ".join(members),
            hint=did_you_mean(tag, members),
        ) from None


def _torchvision(spec: Spec, fetch: bool = True) -> Backbone:
    import torchvision

    arch, _, tag = spec.model.arch.partition(".")
    if arch not in torchvision.models.list_models():
        raise _unknown_backbone(spec, "torchvision", arch)
    weights = _torchvision_weights(spec, arch, tag or None)
    kwargs = dict(spec.model.args)
    if spec.model.num_classes is not None:
        kwargs["num_classes"] = spec.model.num_classes
    try:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - library asserts included: the arguments are the cause
        raise _constructor_error(spec, exc, _meta_build) from None
    notes = []
    switch = _LOGITS_ONLY.get(arch)
    if switch and switch not in spec.model.args and getattr(model, switch, False):
        setattr(model, switch, False)
        notes.append(
            f"{arch}: {switch} set to false (model.args.{switch} not given), so the train-mode forward "
            "returns the logits tensor; the auxiliary classifiers keep their weights but are not trained"
        )
    num_classes = spec.model.num_classes or 1000
    head = _class_dependent(arch, kwargs, model, num_classes) or _torchvision_head(model, num_classes)
    config = _torchvision_data_config(weights)
    backbone = Backbone(model, head, config, num_classes=num_classes, notes=notes)
    if spec.model.pretrained is True and fetch:
        if weights is None:
            raise spec.error(
                ("model", "pretrained"),
                f"torchvision publishes no weights for {arch}",
                found="true",
                expected="false, or a path to a weight file",
            )
        backbone.pretrained = _download_torchvision(spec, weights)
        backbone.pretrained_from = f"torchvision {type(weights).__name__}.{weights.name} ({_hub_file(weights.url)})"
    return backbone


# torchvision builds googlenet and inception_v3 with auxiliary classifiers, and their train-mode
# forward then returns a namedtuple (GoogLeNetOutputs, InceptionOutputs), not the one logits tensor
# the training loop trains on. The models' own switch, the `aux_logits` attribute, picks the return
# type: it is turned off unless model.args sets it. Set on the instance, after construction, so the
# aux modules (and their pretrained weights, which torchvision's builder also loads) stay in place.
_LOGITS_ONLY: dict[str, str] = {"googlenet": "aux_logits", "inception_v3": "aux_logits"}


def logits_switch(spec: Spec) -> str | None:
    """The constructor argument that turns a torchvision model's extra train-mode outputs off, if any."""
    if spec.model.source != "torchvision":
        return None
    return _LOGITS_ONLY.get(spec.model.arch.partition(".")[0])


def _hub_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _download_torchvision(spec: Spec, weights) -> dict[str, torch.Tensor]:
    path = _hub_file(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=False, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise spec.error(
            ("model", "pretrained"),
            f"the weights {type(weights).__name__}.{weights.name} are not cached and cannot be downloaded "
            f"({describe_exception(exc, 300)})",
            found="pretrained: true",
            expected=f"the file {path} (torch hub cache; TORCH_HOME moves it)",
            hint=f"copy {os.path.basename(weights.url)} from a machine with a network into {os.path.dirname(path)}, "
            "or set model.pretrained to the path of a local weight file",
        ) from None


def _class_dependent(arch: str, kwargs: Mapping[str, Any], model: nn.Module, num_classes: int) -> tuple[str, ...]:
    """Modules whose parameters change shape with the class count: the head, aux heads included
    (googlenet, inception_v3). Found by building the architecture again with another count on
    the meta device (no memory, no arithmetic); () when that cannot be done."""
    import warnings

    import torchvision

    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            other = torchvision.models.get_model(arch, weights=None, **{**kwargs, "num_classes": num_classes + 1})
    except Exception:  # noqa: BLE001 - some builders need real tensors; the fallback finds the main head
        return ()
    shapes = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    changed = {k.rpartition(".")[0] for k, v in model.state_dict().items() if shapes.get(k) != tuple(v.shape)}
    return tuple(name for name, _ in model.named_modules() if name in changed)


def _torchvision_head(model: nn.Module, num_classes: int) -> tuple[str, ...]:
    # torchvision builders end with the classifier: the last Linear (or 1x1 Conv, squeezenet)
    # producing num_classes outputs is the head, whatever the attribute is called.
    last = None
    for name, module in model.named_modules():
        out = (
            getattr(module, "out_features", None)
            if isinstance(module, nn.Linear)
            else getattr(module, "out_channels", None)
            if isinstance(module, nn.Conv2d)
            else None
        )
        if out == num_classes:
            last = name
    return (last,) if last else ()


def _torchvision_data_config(weights) -> dict[str, Any]:
    config = {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    if weights is None:
        return config
    try:
        t = weights.transforms()
    except TypeError:
        return config
    crop = int(t.crop_size[0]) if getattr(t, "crop_size", None) else 224
    resize = int(t.resize_size[0]) if getattr(t, "resize_size", None) else crop
    config.update(
        input_size=(3, crop, crop),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=str(t.interpolation.value),
        crop_pct=crop / resize,
    )
    return config


# --------------------------------------------------------------------------- timm
def _timm(spec: Spec, fetch: bool = True) -> Backbone:
    import timm

    name = spec.model.arch
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise _unknown_backbone(spec, "timm", name)
    if "." in name:
        tags = timm.list_pretrained(arch + ".*")
        if name not in tags:
            raise spec.error(
                ("model", "backbone"),
                f"timm has no pretrained tag {name!r}",
                found=name,
                expected="one of " + ", ".join(tags[:8]) + (" ..." if len(tags) > 8 else ""),
                hint=did_you_mean(name, tags),
            )
    pretrained = spec.model.pretrained is True and fetch
    kwargs = dict(spec.model.args)
    if pretrained and not _timm_weights_reachable(name) and not _meta_build_fails(spec):
        # not cached and no network: say so now, not after huggingface_hub's retries (about 50 s)
        raise _timm_offline(spec, name, ConnectionError("not in the cache, and the hub cannot be reached"))
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001 - library asserts included (global_pool: zzz)
        if pretrained and not _meta_build_fails(spec):  # the architecture builds: the weights are missing
            raise _timm_offline(spec, name, exc) from None
        raise _constructor_error(spec, exc, _meta_build) from None
    backbone = Backbone(model, (), {}, num_classes=model.num_classes)
    if pretrained:
        # The library loaded (and, for converted checkpoints, filtered) its weights into `model`;
        # its state_dict is the source the load report accounts for.
        backbone.pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cfg = model.pretrained_cfg
        where = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or "timm"
        backbone.pretrained_from = f"timm {name} ({where})"
    if spec.model.num_classes is not None and spec.model.num_classes != model.num_classes:
        model.reset_classifier(spec.model.num_classes)
        backbone.num_classes = spec.model.num_classes
    backbone.head = _timm_head(model)
    data_config = timm.data.resolve_model_data_config(model)
    backbone.data_config = {
        k: data_config[k]
        for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
        if k in data_config
    }
    return backbone


def _timm_weights_reachable(name: str) -> bool:
    """Are timm's weights for `name` in the local cache, or is the server that has them reachable?"""
    import socket
    from urllib.parse import urlparse

    import timm

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    if cfg is None:
        return True  # let timm say what is wrong
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on it
            return True
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files):
            return True
        if constants.HF_HUB_OFFLINE:
            return False
        host = urlparse(constants.ENDPOINT).hostname
    elif cfg.url:
        if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))):
            return True
        host = urlparse(cfg.url).hostname
    else:
        return True
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def _timm_offline(spec: Spec, name: str, exc: Exception) -> Exception:
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    try:  # the cache folder huggingface_hub really uses (HF_HUB_CACHE, else HF_HOME/hub)
        from huggingface_hub import constants

        hub_cache = constants.HF_HUB_CACHE
    except ImportError:
        hub_cache = os.path.join(
            os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
        )
    where = (
        f"the Hugging Face cache {os.path.join(hub_cache, 'models--' + hub_id.replace('/', '--'))} (hub id {hub_id})"
        if hub_id
        else "timm's cache"
    )
    return spec.error(
        ("model", "pretrained"),
        f"timm could not load pretrained weights for {name} ({describe_exception(exc, 200)})",
        found="pretrained: true",
        expected=f"the weights in {where}",
        hint="on a machine with a network run `python -c \"import timm; timm.create_model('"
        + name
        + "', pretrained=True)\"` and copy the cache over, or set model.pretrained to a local weight file "
        "(timm's model.safetensors / pytorch_model.bin work as they are)",
    )


def _timm_head(model: nn.Module) -> tuple[str, ...]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    modules = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    ids = {id(m) for m in modules if isinstance(m, nn.Module) and any(True for _ in m.parameters())}
    return tuple(name for name, m in model.named_modules() if id(m) in ids)
