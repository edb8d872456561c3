"""`train.regularize`: regularisers toward the pretrained model, added to the training loss.

    l2_sp    alpha / 2 * ||w - w0||^2 over the parameters loaded from the pretrained weights
             (Li, Grandvalet and Davoine 2018), w0 kept as one flat copy on the device of the
             parameters that ever train; the optimizer gives those parameters no weight decay
    l2_new   beta / 2 * ||w||^2 over the parameters that were not loaded (new head, inserted modules)
    lwf      LwF-style distillation (Li and Hoiem 2016): the pretrained model's original head,
             frozen, applied to the student's head input and to the teacher's; T^2 * KL(teacher ||
             student) of the logits softened by T. Without an original head (the weights had none,
             or it does not fit the head input), the mean squared error of the head input itself
    distill  the student's output at a module path against the teacher's: MSE, or 1 - cosine

The teacher is the spec's own model as `build` made it, before any step: identity insertion makes
it the pretrained network exactly. It is a frozen deep copy on the run's device and precision,
never wrapped for DDP, in eval mode except its BatchNorm layers, which take the student's mode at
every stage: a norm that trains normalises each batch by the batch's statistics in the student,
and so in the teacher (whose running statistics never move: momentum 0), while a frozen norm uses
its running statistics in both. So at step 0 the teacher computes exactly what the student
computes, and the terms measure only how far the weights moved (an eval-mode teacher would differ
from a train-mode student from the first batch, by the data's statistics alone). The run is resumed from a checkpoint
after the teacher is taken, so a resumed run has the same teacher and the same w0. A distillation
term is computed only while some trainable parameter runs before the point it compares (read off
the build's shape probe, which records when every module started and ended): otherwise student
and teacher agree there, the term has no gradient, and neither the teacher nor the term runs (a head-only
stage keeps its feature cache).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..model.builder import Built
    from ..spec import Spec


def distill_path(spec: Spec, built: Built) -> str | None:
    """`train.regularize.distill.at`, checked against the model's modules; None when distill is off.

    Raises:
        SpecError: no module has that path (with the closest real ones).
    """
    distill = spec.train.regularize.distill
    if distill is None:
        return None
    modules = dict(built.model.named_modules())
    if distill.at not in modules or not distill.at:
        from ..model.paths import nearest

        close = nearest(distill.at, [p for p in modules if p])
        raise spec.error(
            ("train", "regularize", "distill", "at"),
            f"the model has no module {distill.at!r}",
            found=repr(distill.at),
            expected="an exact module path of the model (surgery inspect SPEC lists them)",
            hint=f"did you mean {', '.join(close)}?" if close else None,
        )
    if built.shapes.get(distill.at) is None or built.shapes[distill.at].calls == 0:
        raise spec.error(
            ("train", "regularize", "distill", "at"),
            f"the module {distill.at!r} does not run in the model's forward pass",
            found=repr(distill.at),
            expected="a module the forward pass calls",
        )
    return distill.at


def _original_head(spec: Spec, built: Built) -> tuple[nn.Module | None, str]:
    """The pretrained weights' own classifier (the spec's model built with the backbone's own
    classes and head), or None and why not."""
    from ..model.builder import build
    from ..spec import load_spec

    if len(built.head) != 1:
        return None, "the head is not one module"
    raw = spec.resolved_raw()
    model = dict(raw["model"], num_classes=None, reset_head=False)
    model.pop("head", None)
    raw = {**raw, "model": model}
    raw.pop("groups", None)  # groups may name modules of the declared head
    try:
        teacher = build(load_spec(raw))
    except Exception as exc:  # noqa: BLE001 - any failure only means: distil features instead
        return None, f"the backbone with its own head could not be built ({type(exc).__name__})"
    path = teacher.head[0] if len(teacher.head) == 1 else None
    if path is None:
        return None, "the backbone's own head is not one module"
    head = teacher.model.get_submodule(path)
    names = [f"{path}.{n}" for n, _ in head.named_parameters()]
    if not names or any(n not in teacher.report.loaded for n in names):
        return None, "the pretrained weights have no classifier of their own"
    shape = built.shapes.get(built.head[0])
    try:
        with torch.no_grad():
            out = head.eval()(torch.zeros(shape.inputs if shape and shape.inputs else (1, 1)))
    except Exception:  # noqa: BLE001 - another input shape: the declared head pools itself
        return None, "the original classifier does not take this model's head input"
    return head, f"the original head's {out.shape[-1]} logits"


def _feeds(built: Built, model: nn.Module, until: int) -> dict[str, bool]:
    """Parameter name -> whether its module starts before the probe's call `until`: only such
    parameters change what a module has computed by then (ancestors counted, to be safe)."""
    starts = {path: s.start for path, s in built.shapes.items() if s.calls}
    out = {}
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        out[name] = owner in starts and starts[owner] < until
    return out


class _Capture:
    """Forward hooks that keep one module's input (the head's) or output (the distilled path's)."""

    def __init__(self, model: nn.Module, head: str | None, at: str | None) -> None:
        self.on, self.kept, self.handles = False, {}, []
        if head is not None:
            self.handles.append(model.get_submodule(head).register_forward_pre_hook(self._head))
        if at is not None:
            self.handles.append(model.get_submodule(at).register_forward_hook(self._at))

    def _head(self, module: nn.Module, args: tuple) -> None:
        if self.on:
            self.kept["head"] = args[0]

    def _at(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.on:
            self.kept["at"] = output

    @contextlib.contextmanager
    def __call__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.kept.clear()
        self.on = True
        try:
            yield self.kept
        finally:
            self.on = False


@dataclass
class Regularizer:
    """The terms of `train.regularize` for one run, built once by `make_regularizer`."""

    spec: Any  # RegularizeSpec
    pretrained: list[tuple[str, nn.Parameter]]  # loaded and in a group that trains at some epoch
    anchor: torch.Tensor  # w0 of `pretrained`, one flat copy on the device
    new: list[tuple[str, nn.Parameter]]
    teacher: nn.Module | None = None
    old_head: nn.Module | None = None
    lwf_target: str = ""
    student_hooks: _Capture | None = None
    teacher_hooks: _Capture | None = None
    feeds_head: dict[str, bool] = field(default_factory=dict)
    feeds_at: dict[str, bool] = field(default_factory=dict)
    live: dict[str, bool] = field(default_factory=dict)  # lwf/distill: computed in this stage
    offsets: list[tuple[int, int]] = field(default_factory=list)
    teacher_seconds: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """The configured terms, as logged (reg_<name> in metrics.jsonl)."""
        s = self.spec
        return tuple(
            k
            for k, on in (
                ("l2_sp", s.l2_sp > 0),
                ("l2_new", s.l2_new > 0),
                ("lwf", s.lwf is not None),
                ("distill", s.distill is not None),
            )
            if on
        )

    def describe(self) -> str:
        s, parts = self.spec, []
        if s.l2_sp:
            parts.append(
                f"l2_sp {s.l2_sp:g} over {len(self.pretrained)} pretrained tensors "
                f"({self.anchor.numel():,} values, w0 {self.anchor.numel() * 4 / 2**20:.1f} MiB on "
                f"{self.anchor.device.type}; no weight decay on them)"
            )
        if s.l2_new:
            parts.append(f"l2_new {s.l2_new:g} over {len(self.new)} new tensors")
        if s.lwf is not None:
            parts.append(f"lwf {s.lwf.weight:g} at T={s.lwf.temperature:g} on {self.lwf_target}")
        if s.distill is not None:
            parts.append(f"distill {s.distill.weight:g} ({s.distill.loss}) at {s.distill.at}")
        if self.teacher is not None:
            size = sum(t.numel() * t.element_size() for t in self.teacher.state_dict().values())
            parts.append(
                f"teacher: the step-0 model, frozen, its BatchNorm in the student's mode ({size / 2**20:.1f} MiB)"
            )
        return "train.regularize: " + "; ".join(parts)

    def update(self, model: nn.Module) -> str:
        """A new trainable set (the student's modes already set for it): the teacher's BatchNorm
        layers take the student's mode; which distillation terms have a gradient now; a line for the log."""
        if self.teacher is not None:
            modes = {path: m.training for path, m in model.named_modules()}
            for path, module in self.teacher.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(modes.get(path, False))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.live = {
            "lwf": self.spec.lwf is not None and any(self.feeds_head.get(n) for n in trainable),
            "distill": self.spec.distill is not None and any(self.feeds_at.get(n) for n in trainable),
        }
        self.offsets = []
        offset = 0
        for name, p in self.pretrained:
            if name in trainable:
                self.offsets.append((len(self.offsets), offset))
            offset += p.numel()
        idle = [k for k in ("lwf", "distill") if getattr(self.spec, k) is not None and not self.live[k]]
        if not idle:
            return ""
        return (
            f"train.regularize: {', '.join(idle)} not computed while nothing trainable runs before the "
            "point compared (student and teacher agree there: no gradient)"
        )

    def take_teacher_seconds(self) -> float:
        """Seconds the teacher ran since the last call (once per epoch, for metrics.jsonl)."""
        seconds, self.teacher_seconds = self.teacher_seconds, 0.0
        return seconds

    def capture(self) -> contextlib.AbstractContextManager:
        """Around the student's forward: keep what the distillation terms compare."""
        if self.student_hooks is None or not any(self.live.values()):
            return contextlib.nullcontext({})
        return self.student_hooks()

    def terms(self, x: torch.Tensor, kept: dict[str, torch.Tensor], autocast: Any) -> dict[str, torch.Tensor]:
        """Every configured term that has a gradient now, weighted as it enters the loss (float32)."""
        s, out = self.spec, {}
        if s.l2_sp:
            out["l2_sp"] = 0.5 * s.l2_sp * self._sp_distance()
        if s.l2_new:
            live = [p for _, p in self.new if p.requires_grad]
            zero = self.anchor.new_zeros(())
            out["l2_new"] = 0.5 * s.l2_new * sum((p.float().pow(2).sum() for p in live), zero)
        if kept and self.teacher is not None:
            start = time.perf_counter()
            with torch.no_grad(), autocast(), self.teacher_hooks() as theirs:
                self.teacher(x)
            self.teacher_seconds += time.perf_counter() - start
            if self.live.get("lwf"):
                out["lwf"] = s.lwf.weight * self._lwf(kept["head"], theirs["head"])
            if self.live.get("distill"):
                out["distill"] = s.distill.weight * _compare(kept["at"], theirs["at"], s.distill.loss)
        return out

    def _sp_distance(self) -> torch.Tensor:
        total = self.anchor.new_zeros(())
        for index, offset in self.offsets:
            p = self.pretrained[index][1]
            total = total + (p.float() - self.anchor[offset : offset + p.numel()].view_as(p)).pow(2).sum()
        return total

    def _lwf(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.old_head is None:
            return F.mse_loss(student.float(), teacher.float())
        t = self.spec.lwf.temperature
        theirs = F.softmax(self.old_head(teacher).float() / t, dim=1)
        mine = F.log_softmax(self.old_head(student).float() / t, dim=1)
        return F.kl_div(mine, theirs, reduction="batchmean") * t * t


def _compare(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    student, teacher = student.float(), teacher.float()
    if loss == "cosine":
        return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    return F.mse_loss(student, teacher)


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for module in teacher.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # in train mode: the batch's statistics, the running ones never move
    return teacher


def make_regularizer(spec: Spec, built: Built, model: nn.Module) -> Regularizer | None:
    """The run's regulariser, from the model as built (step 0, already on its device); None when
    `train.regularize` is all off."""
    reg = spec.train.regularize
    if not reg.active:
        return None
    loaded = set(built.report.loaded)
    trains = [g for g in built.groups if g.spec.unfreeze_at is not None or g.spec.unfreeze_rule is not None]
    ever = {p for g in trains for p in g.params}
    named = list(model.named_parameters())
    pretrained = [(n, p) for n, p in named if n in loaded and n in ever]
    anchor = (
        torch.cat([p.detach().float().reshape(-1) for _, p in pretrained]).clone()
        if pretrained
        else torch.zeros(0, device=next(model.parameters()).device)
    )
    out = Regularizer(spec=reg, pretrained=pretrained, anchor=anchor, new=[(n, p) for n, p in named if n not in loaded])
    at = distill_path(spec, built)
    if reg.lwf is None and at is None:
        return out
    head = built.head[0] if reg.lwf is not None and len(built.head) == 1 else None
    out.teacher = _frozen_copy(model)
    if reg.lwf is not None:
        old, why = _original_head(spec, built)
        out.old_head = _frozen_copy(old).to(anchor.device) if old is not None else None
        out.lwf_target = why if old is not None else f"the head input (MSE; {why})"
        out.feeds_head = _feeds(built, model, built.shapes[head].start) if head else {}
    if at is not None:
        out.feeds_at = _feeds(built, model, built.shapes[at].end)
    out.student_hooks = _Capture(model, head, at)
    out.teacher_hooks = _Capture(out.teacher, head, at)
    return out


def exempt_from_decay(spec: Spec, built: Built) -> frozenset[str]:
    """With l2_sp on, the loaded parameters take no weight decay: L2-SP replaces it for them."""
    if not spec.train.regularize.l2_sp:
        return frozenset()
    return frozenset(built.report.loaded)


__all__ = ["Regularizer", "distill_path", "exempt_from_decay", "make_regularizer"]
