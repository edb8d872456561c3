"""Multi-scale feature maps of a surgered backbone, for detection and segmentation heads.

A `FeatureBackbone` wraps the surgered model and returns, for one input batch, the outputs of its
stage modules as a list of NCHW maps, exactly the tensors the classifier computes there (fp32,
`torch.equal`): an inserted module attached `after` a stage module is part of that module's
output (a plain Sequential gets it as its last child, any other module runs it inside its own
forward), so the CBAM after `layer3` is in `layer3`'s map.

Stages:
- timm models carry `feature_info` (the module names and reductions `features_only` uses): those
  are the stages, in that order, and `out_indices` index them as `features_only` does.
- torchvision models carry none: the stages come from the shape probe. The main path is the
  root's children in call order, a plain `nn.Sequential` whose input and output differ by more
  than one halving opened into its children (`features` of MobileNet, EfficientNet, VGG); along
  it, up to the first global pool or head module, the last module of each spatial reduction
  with a 4-D output is a stage (resnet18: relu, layer1, layer2, layer3, layer4), as timm's
  `feature_info` would name them.
- any module path by `stages=[...]`. Surgery adds modules and renames none, so the backbone's
  paths stay valid after it.

Maps laid out (N, H, W, C) (Swin stages, timm's NHWC families) are permuted to NCHW. Token
sequences (ViT blocks) are not maps: they are refused with the reason, never reshaped by guess.

The wrapped model runs its whole forward (the head included: a pool and a linear layer, a small
cost) with forward hooks on the stage modules, which keeps exact parity with the classifier for
any forward, however the library wrote it.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import files
from ..errors import Origin, UsageError, describe_exception
from ..model.builder import Built, build
from ..model.insert import Shapes, channels_last
from ..model.paths import nearest
from ..runs import layout, open_run
from ..runs.loaded import REBUILD_OVERRIDES, LoadedRun, load_strict
from ..spec import Spec, load_spec

FEATURES = "features"  # the export's folder inside RUN/export/, and the --format value
WEIGHTS_FILE, SPEC_FILE, INFO_FILE, PROGRAM_FILE = "features.safetensors", "spec.yaml", "features.json", "features.pt2"
FORMAT_VERSION = 1
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.Flatten)


@dataclass(frozen=True)
class Stage:
    """One output map: its module path, channels, reduction (input size / map size), layout, and
    its NCHW shape on the probe input."""

    module: str
    num_chs: int
    reduction: int
    channels_last: bool = False
    shape: tuple[int, ...] = ()

    def info(self) -> dict[str, Any]:
        return {"module": self.module, "num_chs": self.num_chs, "reduction": self.reduction}


# --------------------------------------------------------------------------- stages
def _height(shape: Sequence[int]) -> int:
    # the probe input is square: (N, C, H, H) or (N, H, H, C)
    if len(shape) == 4 and shape[1] == shape[2] != shape[3]:
        return shape[1]
    return shape[2] if len(shape) == 4 else shape[-1]


def _spans(shapes: Shapes | None) -> bool:
    """Does a module shrink its input by more than one halving (so it holds several stages)?"""
    if shapes is None or not shapes.inputs or not shapes.output or len(shapes.inputs) != 4 or len(shapes.output) < 3:
        return False
    return _height(shapes.inputs) > 2 * _height(shapes.output)


def _main_path(model: nn.Module, shapes: Mapping[str, Shapes]) -> list[str]:
    path: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        kids = [(prefix + n, m) for n, m in module.named_children() if prefix + n in shapes]
        for name, child in sorted(kids, key=lambda k: shapes[k[0]].start):
            plain = isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward
            if plain and _spans(shapes[name]):
                walk(child, name + ".")
            else:
                path.append(name)

    walk(model, "")
    return path


def _layout(module: nn.Module, shape: Sequence[int], num_chs: int | None = None) -> bool:
    """True for an (N, H, W, C) map; timm's channel count decides where the probe cannot."""
    if num_chs is not None and shape[1] != num_chs and shape[-1] == num_chs:
        return True
    if num_chs is not None and shape[1] == num_chs:
        return False
    return channels_last(module, shape)


def _nchw(shape: Sequence[int], last: bool) -> tuple[int, ...]:
    return (shape[0], shape[3], shape[1], shape[2]) if last else tuple(shape)


def _probed_stages(built: Built) -> list[Stage]:
    """torchvision and other models without `feature_info`: the last module of each reduction."""
    model, shapes, size = built.model, built.shapes, built.input_size[-1]
    by_reduction: dict[int, Stage] = {}
    modules = dict(model.named_modules())
    for name in _main_path(model, shapes):
        module, out = modules[name], shapes[name].output
        if any(name == h or name.startswith(h + ".") for h in built.head) or isinstance(module, _GLOBAL_POOLS):
            break
        if out is None or len(out) != 4 or shapes[name].calls != 1:
            continue
        last = _layout(module, out)
        nchw = _nchw(out, last)
        reduction = max(1, round(size / nchw[2]))
        if by_reduction and reduction < max(by_reduction):
            continue  # an upsampling branch: not a stage of the pyramid
        by_reduction[reduction] = Stage(name, nchw[1], reduction, last, nchw)
    return list(by_reduction.values())


def discover_stages(built: Built) -> list[Stage]:
    """Every stage of a built model, in order: timm's `feature_info`, else the probe (see the module)."""
    info = getattr(built.model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not all(isinstance(i, Mapping) and "module" in i for i in info):
        return _probed_stages(built)
    return [_timm_stage(built, i) for i in info]


def _timm_stage(built: Built, info: Mapping[str, Any]) -> Stage:
    name = str(info["module"])
    shapes = built.shapes.get(name)
    out = shapes.output if shapes is not None else None
    if out is None or len(out) != 4:
        # kept for now: choosing it is refused, with the reason, in `_check_stage`
        return Stage(name, int(info.get("num_chs", 0)), int(info.get("reduction", 0)), False, tuple(out or ()))
    try:
        module = built.model.get_submodule(name)
    except AttributeError:
        module = nn.Identity()
    last = _layout(module, out, int(info.get("num_chs", 0)) or None)
    nchw = _nchw(out, last)
    return Stage(name, nchw[1], int(info.get("reduction", 0)) or round(built.input_size[-1] / nchw[2]), last, nchw)


def _removed(built: Built, path: str) -> Any:
    return next(
        (c for c in built.changes if c.kind == "remove" and (path == c.path or path.startswith(c.path + "."))), None
    )


def _check_stage(built: Built, stage: Stage, origin: Origin) -> None:
    removed = _removed(built, stage.module)
    if removed is not None:
        raise built.spec.error(
            removed.where,
            f"the feature stage {stage.module} is inside {removed.path}, which this spec removes",
            found=f"stage {stage.module}; {removed.label}",
            expected="stages of modules the surgered model still runs",
            hint=f"choose other stages ({origin.label}), or keep {removed.path}",
        )
    names = [n for n, _ in built.model.named_modules() if n]
    if stage.module not in names:
        close = nearest(stage.module, names)
        raise UsageError(
            f"no module {stage.module!r} in {built.spec.model.backbone} to take features from",
            origin=origin,
            found=stage.module,
            expected="a module path of the surgered model (`surgery inspect SPEC --features` lists the stages)",
            hint=("did you mean " + ", ".join(close) + "?") if close else None,
        )
    shapes = built.shapes.get(stage.module)
    if shapes is None or shapes.calls != 1:
        ran = "never runs" if shapes is None else f"runs {abs(shapes.calls)} times"
        raise UsageError(
            f"{stage.module} {ran} in one forward pass: it has no one output to take",
            origin=origin,
            found=stage.module,
            expected="a module the forward calls once",
        )
    if shapes.output is None or len(shapes.output) != 4:
        tokens = shapes.output is not None and len(shapes.output) == 3
        raise UsageError(
            f"{stage.module} outputs {list(shapes.output) if shapes.output else 'no tensor'}, not a 4-D map",
            origin=origin,
            found=f"{stage.module}: {list(shapes.output) if shapes.output else 'no tensor'}",
            expected="a stage whose output is an (N, C, H, W) or (N, H, W, C) feature map",
            hint="a vision transformer's tokens (batch, tokens, dim) are not a map; take features of a "
            "convolutional or hierarchical backbone (ResNet, ConvNeXt, Swin, EfficientNet)"
            if tokens
            else None,
        )


def choose_stages(
    built: Built, out_indices: Sequence[int] | None = None, stages: Sequence[str] | None = None
) -> list[Stage]:
    """The stages to output: by index into `discover_stages` (timm's `out_indices`), by module
    path, or all of them.

    Raises:
        UsageError: both given, an index past the last stage, a path matching no module, or a stage
            that is not a 4-D map run once.
        SpecError: a stage inside a module the spec removes (located at its `remove` entry).
    """
    if out_indices is not None and stages is not None:
        raise UsageError(
            "out_indices and stages both choose the stages: give one",
            origin=Origin.flag("--stages", " ".join(stages)),
            found=f"--out-indices {' '.join(map(str, out_indices))} and --stages {' '.join(stages)}",
            expected="--out-indices or --stages",
        )
    every = discover_stages(built)
    if stages is not None:
        known = {s.module: s for s in every}
        origin = Origin.flag("--stages", " ".join(stages))
        chosen = [known.get(p) or _path_stage(built, p, origin) for p in stages]
    elif out_indices is not None:
        origin = Origin.flag("--out-indices", " ".join(map(str, out_indices)))
        chosen = [_indexed(every, i, origin, built) for i in out_indices]
    else:
        origin, chosen = Origin.flag("--out-indices", "(default: every stage)"), every
    if not chosen:
        raise UsageError(
            f"no feature stages found in {built.spec.model.backbone}",
            origin=origin,
            found="no 4-D maps on the main path",
            expected="stages to output",
            hint="name them with --stages PATH ... (`surgery inspect SPEC` shows the module tree)",
        )
    for stage in chosen:
        _check_stage(built, stage, origin)
    return chosen


def _indexed(every: list[Stage], index: int, origin: Origin, built: Built) -> Stage:
    if not 0 <= index < len(every):
        listed = ", ".join(f"{i}: {s.module}" for i, s in enumerate(every))
        raise UsageError(
            f"out-index {index} is past the stages of {built.spec.model.backbone} "
            f"({len(every)}: 0 to {len(every) - 1})",
            origin=origin,
            found=str(index),
            expected=f"indices 0 to {len(every) - 1} ({listed})",
            hint="`surgery inspect SPEC --features` lists the stages",
        )
    return every[index]


def _path_stage(built: Built, path: str, origin: Origin) -> Stage:
    shapes = built.shapes.get(path)
    out = shapes.output if shapes is not None else None
    if _removed(built, path) is not None or out is None or len(out) != 4:
        return Stage(path, 0, 0, False, tuple(out or ()))  # refused, with its reason, by `_check_stage`
    last = _layout(built.model.get_submodule(path), out)
    nchw = _nchw(out, last)
    return Stage(path, nchw[1], max(1, round(built.input_size[-1] / nchw[2])), last, nchw)


# --------------------------------------------------------------------------- the module
def _keep(captured: dict[str, torch.Tensor], name: str, module: nn.Module, args: tuple, output: Any) -> None:
    captured[name] = output


class FeatureBackbone(nn.Module):
    """The surgered model as a multi-scale backbone: `forward(x) -> list` of NCHW maps.

    Attributes:
        model: the surgered classifier (its state_dict keys are the run's, under ``model.``).
        feature_info: one ``{module, num_chs, reduction}`` per map, in output order (timm's shape).
        channels: the channels of each map; out_channels: the last map's (torchvision's
            convention for a backbone, what `FasterRCNN` reads from a one-map backbone).

    Example:
        >>> body = features_backbone("specs/resnet50-cbam.yaml", out_indices=[2, 3, 4])
        >>> [m.shape[1] for m in body(torch.randn(1, 3, 224, 224))]
        [512, 1024, 2048]
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage]) -> None:
        super().__init__()
        self.model = model
        self.stages = tuple(stages)
        self.feature_info = [s.info() for s in self.stages]
        self.channels = [s.num_chs for s in self.stages]
        self.out_channels = self.channels[-1]

    @classmethod
    def from_built(
        cls, built: Built, out_indices: Sequence[int] | None = None, stages: Sequence[str] | None = None
    ) -> "FeatureBackbone":
        """Wrap `built.model` at the chosen stages (`choose_stages`)."""
        chosen = choose_stages(built, out_indices, stages)
        _check_not_overwritten(built.model, [s.module for s in chosen], built.input_size)
        return cls(built.model, chosen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = [
            self.model.get_submodule(s.module).register_forward_hook(partial(_keep, captured, s.module))
            for s in self.stages
        ]
        try:
            self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        maps = []
        for s in self.stages:
            y = captured[s.module]
            maps.append(y.permute(0, 3, 1, 2) if s.channels_last else y)
        return maps

    def extra_repr(self) -> str:
        return "stages=" + ", ".join(f"{s.module} ({s.num_chs} ch, /{s.reduction})" for s in self.stages)


def _check_not_overwritten(model: nn.Module, paths: Sequence[str], size: Sequence[int]) -> None:
    """Stages whose output tensor a later in-place op overwrites (read off the tensor's version):
    those are refused, since a hook would hand out the overwritten values."""
    versions: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        versions[name], outputs[name] = output._version, output

    handles = [model.get_submodule(p).register_forward_hook(partial(record, p)) for p in paths]
    param = next(model.parameters(), None)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            was = model.training
            model.eval()
            model(torch.zeros(1, *size, dtype=param.dtype if param is not None else torch.float32))
            model.train(was)
    finally:
        for handle in handles:
            handle.remove()
    changed = tuple(p for p in paths if outputs[p]._version != versions[p])
    if changed:
        raise UsageError(
            f"the output of {changed[0]} is overwritten in place by a later module",
            origin=Origin.flag("--stages", " ".join(paths)),
            found=", ".join(changed),
            expected="stages whose output the model keeps as it is (e.g. the in-place ReLU after it)",
            hint="choose the module that overwrites it (the activation after it) as the stage",
        )


def features_backbone(
    spec: str | Path | Mapping | Spec,
    out_indices: Sequence[int] | None = None,
    stages: Sequence[str] | None = None,
    pretrained: bool = True,
) -> FeatureBackbone:
    """A surgered, untrained backbone for a detector or segmenter, straight from a spec.

    Args:
        spec: a spec file, a mapping, or a loaded `Spec`.
        out_indices: indices into the stages (as timm's `features_only`); default: every stage.
        stages: module paths instead (``["layer2", "layer3", "layer4"]``).
        pretrained: False builds the architecture only (``model.pretrained=false``).

    Returns:
        A `FeatureBackbone` in train mode on the CPU: pretrained tensors as the spec loads them,
        inserted modules at identity where the spec says `init: identity`.

    Example:
        >>> body = features_backbone({"model": {"backbone": "timm:resnet50"},
        ...                           "surgery": [{"insert": "cbam", "at": "layer[2-4]"}]}, out_indices=[2, 3, 4])
        >>> detector = torchvision.models.detection.FasterRCNN(with_fpn(body), num_classes=3)
    """
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if not pretrained:
        spec = replace(spec, model=replace(spec.model, pretrained=False))
    return FeatureBackbone.from_built(build(spec), out_indices, stages)


# --------------------------------------------------------------------------- FPN
class FeaturePyramid(nn.Module):
    """`FeatureBackbone` + torchvision's `FeaturePyramidNetwork`: what torchvision's
    `BackboneWithFPN` is, for any stages. Returns an OrderedDict of maps ('0', '1', ..., and
    'pool' from the default `LastLevelMaxPool`), each `out_channels` wide."""

    def __init__(self, body: FeatureBackbone, out_channels: int = 256, extra_blocks: nn.Module | None = None) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(body.channels),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def with_fpn(
    backbone: FeatureBackbone, out_channels: int = 256, extra_blocks: nn.Module | None = None
) -> FeaturePyramid:
    """The backbone under a feature pyramid, ready for `torchvision.models.detection.FasterRCNN(...)`.

    With 4 stages the pyramid has 5 levels (4 + 'pool'), what FasterRCNN's default anchors expect;
    for another number of stages give the detector an `AnchorGenerator` with one size per level.
    For RetinaNet pass ``extra_blocks=torchvision.ops.feature_pyramid_network.LastLevelP6P7(C, C)``.
    """
    return FeaturePyramid(backbone, out_channels, extra_blocks)


# --------------------------------------------------------------------------- export and load
@dataclass
class FeaturesExport:
    """What `export_features` wrote: the folder, its feature_info, the check, notes."""

    folder: Path
    feature_info: list[dict[str, Any]]
    max_abs_diff: float
    batch: int | None
    notes: list[str] = field(default_factory=list)


def default_folder(run_dir: Path) -> Path:
    return Path(run_dir) / layout.EXPORT / FEATURES


@torch.inference_mode()
def _maps(forward: Any, sample: torch.Tensor, batch: int | None) -> list[torch.Tensor]:
    chunks = [sample] if batch is None else list(sample.split(batch))
    outs = [forward(c) for c in chunks]
    return [torch.cat([o[i].float() for o in outs]) for i in range(len(outs[0]))]


def _program(backbone: FeatureBackbone, sample: torch.Tensor, notes: list[str]) -> tuple[bytes, int | None]:
    from .export import ExportFailed, _dynamic_or_static

    def export(example: torch.Tensor, dynamic: bool) -> Any:
        shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
        return torch.export.export(backbone, (example,), dynamic_shapes=shapes)

    try:
        program, batch = _dynamic_or_static(export, sample, notes)
    except Exception as exc:  # noqa: BLE001 - the exporter's own message is the useful part
        raise ExportFailed("features: torch.export failed on this model: " + describe_exception(exc, 600)) from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue(), batch


def _compare(program: bytes, sample: torch.Tensor, reference: list[torch.Tensor], batch: int | None) -> float:
    from .export import TOLERANCE, ExportFailed

    reloaded = torch.export.load(io.BytesIO(program)).module()
    got = _maps(reloaded, sample, batch)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, reference))
    limit = TOLERANCE * max(1.0, max(float(r.abs().max()) for r in reference))
    if not diff <= limit:
        raise ExportFailed(
            f"features: the exported maps differ from the trained model's by up to {diff:.3g} "
            f"(more than {limit:.3g}); nothing was written"
        )
    return diff


def _info(run: LoadedRun, backbone: FeatureBackbone, out_indices: Any, sample: torch.Tensor, diff: float, batch: Any):
    return {
        "format": f"surgery-features/{FORMAT_VERSION}",
        "run": str(run.run_dir),
        "backbone": run.spec.model.backbone,
        "weights": str(run.weights),
        "inserted": [i.path for i in run.built.inserted],
        "feature_info": backbone.feature_info,
        "stages": [s.module for s in backbone.stages],
        "out_indices": None if out_indices is None else list(out_indices),
        "layout": {s.module: "NHWC permuted to NCHW" if s.channels_last else "NCHW" for s in backbone.stages},
        "input": {
            "description": "normalised float32 images NCHW: x = (pixel / 255 - mean) / std",
            "shape": ["batch" if batch is None else batch, run.data_config["input_size"][0], "H", "W"],
            "image_size": run.image_size,
            "mean": list(run.mean),
            "std": list(run.std),
        },
        "output": "a list of NCHW maps, one per feature_info entry",
        "files": {"weights": WEIGHTS_FILE, "spec": SPEC_FILE, "program": PROGRAM_FILE},
        "check": {
            "inputs": f"{sample.shape[0]} standard normal inputs of shape {list(sample.shape[1:])} (seed 0)",
            "compared_with": "torch.export.load",
            "max_abs_diff": diff,
        },
        "versions": {"torch": torch.__version__},
    }


def export_features(
    run: LoadedRun | str | Path,
    out_indices: Sequence[int] | None = None,
    stages: Sequence[str] | None = None,
    out: str | Path | None = None,
    weights: str | None = None,
) -> FeaturesExport:
    """Write a run's surgered backbone as a features folder, checked against the run's model.

    The folder (default RUN/export/features/) holds features.safetensors (the surgered model's
    state, the run's keys), spec.yaml (the run's), features.json (feature_info, out_indices,
    input size, mean/std, the check) and features.pt2 (`torch.export` of the `FeatureBackbone`:
    loadable with `torch.export.load` without surgery). It is written whole or not at all.

    Raises:
        UsageError / SpecError: stages that cannot be chosen (see `choose_stages`).
        ExportFailed: torch.export rejects the module, or its maps differ from the model's.
        RunDirError: the folder cannot be written (a full disk): nothing is left.
    """
    from safetensors.torch import save

    from .export import sample_batch

    if not isinstance(run, LoadedRun):
        run = open_run(run).load("cpu", weights)
    run.model.to("cpu").eval()
    backbone = FeatureBackbone.from_built(run.built, out_indices, stages).eval()
    sample = sample_batch(run)
    reference = _maps(backbone, sample, None)
    notes: list[str] = []
    program, batch = _program(backbone, sample, notes)
    diff = _compare(program, sample, reference, batch)
    state = {k: v.detach().to("cpu").contiguous() for k, v in run.model.state_dict().items()}
    folder = Path(out) if out is not None else default_folder(run.run_dir)
    info = _info(run, backbone, out_indices, sample, diff, batch)
    files.write_folder(
        folder,
        {
            WEIGHTS_FILE: save(state, metadata={"format": f"surgery-features/{FORMAT_VERSION}"}),
            SPEC_FILE: _spec_bytes(run),
            INFO_FILE: (json.dumps(info, indent=1, default=files.jsonable) + "\n").encode(),
            PROGRAM_FILE: program,
        },
    )
    return FeaturesExport(folder, backbone.feature_info, diff, batch, notes)


def _spec_bytes(run: LoadedRun) -> bytes:
    if run.run is not None:
        path = run.run.file(layout.SPEC)
        if path.is_file():
            return files.read_regular(path)
    return run.spec.to_yaml().encode()


def load_features(folder: str | Path) -> FeatureBackbone:
    """A features folder (`export_features`) back as a `FeatureBackbone`, in eval mode on the CPU.

    The model is rebuilt from its spec.yaml with every weight source off, then its
    features.safetensors loaded strictly (every tensor, nothing else), at the stages features.json names.
    """
    from ..runs.writer import load_safetensors

    folder = Path(folder)
    for name in (SPEC_FILE, WEIGHTS_FILE, INFO_FILE):
        if not (folder / name).is_file():
            raise UsageError(
                f"{folder} is not a features folder: {name} is missing",
                origin=Origin.path(folder),
                found=", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "no such folder",
                expected=f"{SPEC_FILE}, {WEIGHTS_FILE} and {INFO_FILE} (`surgery export RUN --format features`)",
            )
    info = json.loads(files.read_regular(folder / INFO_FILE))
    built = build(load_spec(folder / SPEC_FILE, REBUILD_OVERRIDES))
    load_strict(built.model, load_safetensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE, folder)
    return FeatureBackbone.from_built(built, stages=info["stages"]).eval()


# --------------------------------------------------------------------------- the command
def export_command(
    run_dir: str | Path,
    out_indices: Sequence[int] | None = None,
    stages: Sequence[str] | None = None,
    out: str | Path | None = None,
    weights: str | None = None,
) -> int:
    """`surgery export RUN --format features [--out-indices I ... | --stages PATH ...] [--out DIR]`;
    exit 1 when the export fails."""
    from rich.markup import escape

    from ..untrusted import Console
    from .export import ExportFailed

    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    trained = open_run(run_dir)
    trained.require_trained(weights)
    run = trained.load("cpu", weights)
    if run.note:
        err.print(f"[yellow]note[/yellow] {escape(run.note)}")
    try:
        result = export_features(run, out_indices, stages, out)
    except ExportFailed as exc:
        err.print(f"[bold red]export failed[/bold red] {escape(str(exc))}")
        return 1
    for note in result.notes:
        err.print(f"[yellow]note[/yellow] {escape(note)}")
    maps = ", ".join(f"{i['module']} ({i['num_chs']} ch, /{i['reduction']})" for i in result.feature_info)
    console.print(
        f"[green]wrote[/green] {escape(str(result.folder))}: {escape(maps)}; "
        f"max abs diff {result.max_abs_diff:.3g} vs the trained model (torch.export.load)"
    )
    return 0


__all__ = [
    "FeatureBackbone",
    "FeaturePyramid",
    "FeaturesExport",
    "Stage",
    "choose_stages",
    "discover_stages",
    "export_features",
    "export_command",
    "features_backbone",
    "load_features",
    "with_fpn",
]
