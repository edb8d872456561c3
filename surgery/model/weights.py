"""Weight files in, load report out: every pretrained tensor is accounted for, none dropped silently."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import regex
import torch
from torch import nn

from ..errors import describe_exception
from ..files import PATH_PROBLEMS, not_regular, problem
from ..spec import Spec

KEY_MAP_SECONDS = 2.0  # for the whole key map over every key of the file
_KEY_MAP = ("model", "key_map")  # where a key_map error is located in the spec

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


@dataclass
class LoadReport:
    """What happened to every tensor: loaded as is, re-initialised (and why), new, or unused.

    `loaded`, `new` (inserted), `random` (no weights asked for) and `unused` (in the file, fit nothing)
    are key lists; `reinitialised` maps a key to its reason;
    `mapped` maps a model key to the file key it was loaded from where they differ;
    `imports` lists user classes the surgery imported ("package.module:Class").
    `adapted` also names a ViT position embedding resampled to this model's patch grid
    (weights trained at another image size), from-shape -> to-shape.
    Where a spec entry replaced, removed or adapted a module (`changed_modules`), each of its
    tensors is named with the entry responsible: `kept` (loaded bit for bit from the old module's
    tensor of the same name and shape; also in `loaded`), `adapted` (the first convolution's
    filters for model.in_chans), `reinitialised`, and `dropped` (file tensors the new module has
    no place for). `adapters` describes each LoRA adapter; its `lora_A` / `lora_B` keys are `new`,
    and the adapted layer's own `weight` and `bias` load under their own names like any other.
    """

    source: str = "random initialisation"
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)
    defaulted: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    inserted_modules: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    changed_modules: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[dict[str, Any]] = field(default_factory=list)  # LoRA: path, rank, alpha, params (keys in `new`)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["counts"] = {
            "loaded": len(self.loaded),
            "reinitialised": len(self.reinitialised),
            "new": len(self.new),
            "random": len(self.random),
            "unused": len(self.unused),
            "mapped": len(self.mapped),
            "defaulted": len(self.defaulted),
            "kept": len(self.kept),
            "adapted": len(self.adapted),
            "dropped": len(self.dropped),
        }
        return out


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


_MAX_SPECS_SEARCHED = 200  # yaml files read to find the spec that makes a `run:` source


def _producer(spec: Spec, name: str) -> Path | None:
    """The spec file, beside `spec`'s own (or in the working directory), whose run is named `name`."""
    import re

    import yaml

    folders = list(dict.fromkeys([spec.source.folder, Path.cwd()]))
    candidates = [p for folder in folders for pattern in ("*.yaml", "*.yml") for p in sorted(folder.glob(pattern))]
    for path in candidates[:_MAX_SPECS_SEARCHED]:
        if spec.source.file and path.resolve() == Path(spec.source.file).resolve():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) if not_regular(path) is None else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if not isinstance(data, dict) or "model" not in data:
            continue
        own = data.get("name") or re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem).lstrip(".-_+") or "run"
        if own == name:
            return path
    return None


def run_hint(spec: Spec, path: Path) -> str | None:
    """For a missing `run:NAME` weight file: the command that makes it (naming the spec that
    produces that run, when one lies beside this spec or in the working directory), else what a
    `run:` source is."""
    value = spec.model.pretrained
    if not (isinstance(value, str) and value.startswith("run:")):
        return None
    name = value[4:]
    maker = _producer(spec, name)
    runs = path.parent.parent
    if maker is not None:
        try:
            shown = maker.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            shown = maker
        out = "" if runs.name == "runs" else f" --out {runs}"
        return f"run {shown} first: surgery run {shown}{out} (it trains the run {name!r} into {runs / name})"
    return (
        f"run:{name} is the model.safetensors of an earlier run named {name!r} in the same runs folder "
        f"({runs}); train the spec named {name!r} first with surgery run SPEC (the runs folder is --out's parent, "
        "runs/ by default)"
    )


def read_weight_file(spec: Spec, path: Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin/.ckpt (torch.load with weights_only=True) or .safetensors file.

    Accepts a bare state_dict or a checkpoint holding one (`model.checkpoint_key`, else
    'state_dict', 'model', ...); strips `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes.
    """
    where = ("model", "pretrained")
    why = not_regular(path)  # a named pipe would block torch.load forever
    if why is not None:
        is_run = isinstance(spec.model.pretrained, str) and spec.model.pretrained.startswith("run:")
        text = (
            f"the run {spec.model.pretrained[4:]!r} has not been trained yet: its weight file does not exist"
            if is_run and why == "no such file"
            else problem("weight", why, "the weight path is not a file")
        )
        raise spec.error(
            where,
            text,
            found=str(path) if why in ("no such file", *PATH_PROBLEMS) else f"{path} ({why})",
            expected="the model.safetensors a finished run writes"
            if is_run
            else "a .pth, .pt, .bin or .safetensors file (relative paths start at the spec's folder)",
            hint=run_hint(spec, path),
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = _torch_load(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user-facing problem
        hint = None
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            hint = (
                "the file pickles Python objects besides tensors; re-save just the state_dict: "
                "torch.save(model.state_dict(), path)"
            )
        raise spec.error(
            where,
            f"the weight file cannot be read: {describe_exception(exc, 200)}",
            found=str(path),
            expected="an intact PyTorch or safetensors weight file",
            hint=hint,
        ) from None
    state = _find_state_dict(spec, raw, path)
    return _strip_wrappers(state)


def _torch_load(path: Path) -> Any:
    # mmap: a large file is read lazily, not copied once more in memory (VGG16 is 528 MB)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):  # legacy (pre-1.6) format: no mmap
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _find_state_dict(spec: Spec, raw: Any, path: Path) -> Mapping[str, torch.Tensor]:
    key = spec.model.checkpoint_key
    if key is not None:
        if not isinstance(raw, Mapping) or key not in raw:
            keys = list(raw)[:10] if isinstance(raw, Mapping) else []
            raise spec.error(
                ("model", "checkpoint_key"),
                f"the checkpoint has no entry {key!r}",
                found=key,
                expected="one of " + ", ".join(map(str, keys)) if keys else "a checkpoint mapping",
            )
        raw = raw[key]
    elif isinstance(raw, Mapping) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        for candidate in _NESTED_KEYS:
            if isinstance(raw.get(candidate), Mapping):
                raw = raw[candidate]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise spec.error(
            ("model", "pretrained"),
            "the weight file holds no state_dict",
            found=str(path),
            expected="a mapping of parameter names to tensors (or a checkpoint with 'state_dict' / 'model')",
            hint="name the entry that holds it with model.checkpoint_key",
        )
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise spec.error(
            ("model", "pretrained"),
            "the weight file holds no tensors",
            found=str(path),
            expected="a state_dict",
            hint="name the entry that holds it with model.checkpoint_key",
        )
    return tensors


def map_keys(
    spec: Spec,
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    skip: Iterable[str],
    head: Iterable[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename the keys of a file from another codebase: `model.key_map` is 'order' or {regex: replacement}.

    Returns the renamed state and {model key: file key} for every key that changed.
    """
    key_map = spec.model.key_map
    if not key_map:
        return dict(state), {}
    if key_map == "order":
        return _pair_by_order(spec, state, target, set(skip), set(head))
    # --- rename: each rule, in order, applies to the keys the rules before it left
    rules = _compile_rules(spec, key_map)
    out, mapped, hits = _rename(spec, state, rules)
    # --- check: a rule that renamed nothing is a typo
    _check_every_rule_matched(spec, state, rules, hits)
    return out, mapped


def _pair_by_order(
    spec: Spec,
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    skip: set[str],
    head: set[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`key_map: order`: the file's tensors paired one to one, in order, with the model's (less `skip`)."""
    src = [k for k in state if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if k not in skip and not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise spec.error(
            _KEY_MAP,
            f"key_map: order needs as many tensors in the file as in the model; "
            f"the file has {len(src)}, the model {len(dst)}",
            found="order",
            expected="a file of the same architecture from another codebase",
            hint="map names with {regex: replacement} rules instead",
        )
    for i, (s, d) in enumerate(zip(src, dst)):
        if (
            tuple(state[s].shape) != tuple(target[d].shape)
            and d not in head
            and not (d.rpartition(".")[2] == "pos_embed" and state[s].ndim == target[d].ndim == 3)
        ):  # resampled on load
            raise spec.error(
                _KEY_MAP,
                f"key_map: order pairs tensor #{i} of the file, {s} {list(state[s].shape)}, "
                f"with {d} {list(target[d].shape)}: the shapes differ",
                found="order",
                expected="tensors that correspond one to one, in order, with equal shapes",
            )
    # BatchNorm step counters pair by order too when both sides have them all; a file
    # without them (many codebases) leaves the model's counters at their default
    src_steps = [k for k in state if k.endswith("num_batches_tracked")]
    dst_steps = [k for k in target if k not in skip and k.endswith("num_batches_tracked")]
    if len(src_steps) == len(dst_steps):
        src, dst = src + src_steps, dst + dst_steps
    return {d: state[s] for s, d in zip(src, dst)}, {d: s for s, d in zip(src, dst) if s != d}


def _compile_rules(spec: Spec, key_map: Mapping[str, str]) -> list[tuple[Any, str]]:
    """The {regex: replacement} rules compiled, in order; an invalid pattern is a located error."""
    rules = []
    for pattern, repl in key_map.items():
        try:
            rules.append((regex.compile(pattern), repl))
        except regex.error as exc:
            raise spec.error(
                _KEY_MAP + (pattern,),
                f"not a valid regular expression: {exc}",
                found=repr(pattern),
                expected="a Python regular expression",
            ) from None
    return rules


def _rename(
    spec: Spec, state: Mapping[str, torch.Tensor], rules: Sequence[tuple[Any, str]]
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[int]]:
    """Every file key through the rules: the renamed state, {new key: file key} where it changed,
    and how many substitutions each rule made."""
    out: dict[str, torch.Tensor] = {}
    mapped: dict[str, str] = {}
    # `regex` takes Python's syntax and a time limit: a pattern that backtracks without end
    # (`(a|aa)+$`) is stopped and named instead of hanging the load
    deadline = time.monotonic() + KEY_MAP_SECONDS
    hits = [0] * len(rules)
    for key, value in state.items():
        new = _apply_rules(spec, key, rules, hits, deadline, len(state))
        if not new:  # mapped to nothing: the user drops the key on purpose
            continue
        if new in out:
            raise spec.error(
                _KEY_MAP,
                f"key_map sends two file keys to {new!r}",
                found=f"{mapped.get(new, new)} and {key}",
                expected="rules that keep keys distinct",
            )
        out[new] = value
        if new != key:
            mapped[new] = key
    return out, mapped, hits


def _apply_rules(
    spec: Spec, key: str, rules: Sequence[tuple[Any, str]], hits: list[int], deadline: float, n_keys: int
) -> str:
    """`key` renamed by each rule in turn (counting each rule's substitutions in `hits`)."""
    new = key
    for i, (rx, repl) in enumerate(rules):
        try:
            new, n = rx.subn(repl, new, timeout=max(deadline - time.monotonic(), 1e-3))
            hits[i] += n
        except TimeoutError:
            raise spec.error(
                _KEY_MAP + (rx.pattern,),
                f"this pattern is too slow: applying the key map to "
                f"{n_keys} keys took more than {KEY_MAP_SECONDS:g} s (it backtracks on {key!r})",
                found=repr(rx.pattern),
                expected="a pattern without nested repetition, e.g. ^module\\.(.*) instead of (a|aa)+",
            ) from None
        except (regex.error, IndexError) as exc:
            raise spec.error(
                _KEY_MAP + (rx.pattern,),
                f"the replacement cannot be applied: {exc}",
                found=repr(repl),
                expected="a replacement using only groups the pattern has",
            ) from None
    return new


def _check_every_rule_matched(
    spec: Spec, state: Mapping[str, Any], rules: Sequence[tuple[Any, str]], hits: Sequence[int]
) -> None:
    """A rule that matched no key loads nothing it meant to: say so, with the keys it could have meant."""
    for (rx, _), n in zip(rules, hits):
        if not n:
            raise spec.error(
                _KEY_MAP + (rx.pattern,),
                "this key_map rule matches no key of the weight file "
                "(rules apply in order, each to the keys the rules before it left)",
                found=repr(rx.pattern),
                expected="a pattern that matches at least one key",
                hint=_closest_keys(rx.pattern, state),
            )


def _closest_keys(pattern: str, state: Mapping[str, Any]) -> str:
    """The file's key beginnings nearest to what `pattern` spells, for a rule that matched nothing."""
    import difflib

    literal = regex.sub(r"\\(.)", r"\1", regex.sub(r"[\^$*+?()\[\]{}|]", "", pattern))
    starts = sorted({".".join(k.split(".")[:depth]) for k in state for depth in (1, 2, 3)})
    near = difflib.get_close_matches(literal.strip("."), starts, n=3, cutoff=0.5)
    shown = near or [k for k in starts if "." not in k][:3]
    return ("did you mean " if near else "the file's keys begin with ") + ", ".join(repr(k) for k in shown)


@dataclass
class _Ledger:
    """What `load_weights` decided so far: tensors to load, file keys used, and what does not fit."""

    report: LoadReport
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def load(self, key: str, tensor: torch.Tensor) -> None:
        self.updates[key] = tensor
        self.used.add(key)
        self.report.loaded.append(key)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _adaptable(change: Any, key: str, incoming: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    """The first conv's weight of an `in_chans` change: 3 input channels in the file, N here."""
    return (
        change.kind == "in_chans"
        and key == change.path + ".weight"
        and incoming is not None
        and incoming.ndim == 4
        and incoming.shape[1] == 3
        and tensor.shape[1] != 3
        and (incoming.shape[0], *incoming.shape[2:]) == (tensor.shape[0], *tensor.shape[2:])
    )


def _account_changed(
    ledger: _Ledger, key: str, tensor: torch.Tensor, incoming: torch.Tensor | None, change: Any, reset: bool
) -> None:
    """A key under a module a spec entry changed: kept where name and shape fit, adapted, or
    re-initialised, each with the entry's line."""
    report = ledger.report
    fits = incoming is not None and tuple(incoming.shape) == tuple(tensor.shape)
    if _adaptable(change, key, incoming, tensor):
        from .replace import adapt_tensor

        ledger.updates[key] = adapt_tensor(incoming, change.in_chans).to(tensor.dtype)
        ledger.used.add(key)
        report.adapted[key] = f"{change.label}: {list(incoming.shape)} in the weights"
    elif fits and not reset:
        ledger.load(key, incoming)
        report.kept[key] = change.label
    else:
        report.reinitialised[key] = f"{change.label}: " + (
            "head: model.reset_head is true"
            if fits
            else f"shape {list(tensor.shape)} here, {list(incoming.shape)} in the weights"
            if incoming is not None
            else "new in this module"
            if change.kind in ("head", "pool")
            else "the old module had no such tensor"
        )
        if fits:
            ledger.used.add(key)


def _account_plain(
    ledger: _Ledger,
    key: str,
    tensor: torch.Tensor,
    incoming: torch.Tensor | None,
    *,
    inserted: bool,
    head: bool,
    reset: bool,
) -> None:
    """A key no spec entry changed: loaded, new (inserted), re-initialised (head), or a misfit."""
    report = ledger.report
    fits = incoming is not None and tuple(incoming.shape) == tuple(tensor.shape)
    if fits and reset and head:
        ledger.used.add(key)
        report.reinitialised[key] = "head: model.reset_head is true"
    elif fits:
        ledger.load(key, incoming)
    elif inserted:
        report.new.append(key)
    elif head:
        if incoming is not None:
            ledger.used.add(key)
        report.reinitialised[key] = (
            f"head: shape {list(tensor.shape)} here, {list(incoming.shape)} in the weights"
            if incoming is not None
            else "head: not in the weights"
        )
    elif key.endswith("num_batches_tracked"):
        report.defaulted.append(key)
    elif incoming is None:
        ledger.missing.append(key)
    else:
        ledger.used.add(key)
        ledger.mismatched.append(f"{key}: {list(incoming.shape)} in the file, {list(tensor.shape)} in the model")


def _resampled_position(
    model: nn.Module, key: str, incoming: torch.Tensor | None, tensor: torch.Tensor
) -> tuple[torch.Tensor, str] | None:
    """A ViT's absolute position embedding trained for another image size, resampled to this
    model's patch grid as timm's own checkpoint_filter_fn does (class / register tokens kept as
    they are): (tensor, words for the load report), or None where `key` is no such embedding."""
    owner_path, _, name = key.rpartition(".")
    if (
        name != "pos_embed"
        or incoming is None
        or incoming.ndim != 3
        or tensor.ndim != 3
        or tuple(incoming.shape) == tuple(tensor.shape)
        or incoming.shape[-1] != tensor.shape[-1]
    ):
        return None
    owner = model.get_submodule(owner_path) if owner_path else model
    grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
    if grid is None:
        return None
    prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 1))
    side = math.isqrt(incoming.shape[1] - prefix)
    if side * side != incoming.shape[1] - prefix:
        return None  # not a square grid in the file: nothing to resample from
    from timm.layers import resample_abs_pos_embed

    out = resample_abs_pos_embed(
        incoming.float(),
        new_size=list(grid),
        old_size=[side, side],
        num_prefix_tokens=prefix,
        interpolation="bicubic",
        antialias=True,
    )
    if tuple(out.shape) != tuple(tensor.shape):
        return None
    return out.to(tensor.dtype), (
        f"position embedding resampled {list(incoming.shape)} -> {list(tensor.shape)}: "
        f"{side}x{side} -> {grid[0]}x{grid[1]} patches, {prefix} prefix token(s) kept "
        "(timm resample_abs_pos_embed, bicubic)"
    )


def _check_everything_fits(spec: Spec, source: str, ledger: _Ledger) -> None:
    """A backbone key missing or of another shape, or a file key nothing used: a located error."""
    missing, mismatched, unused = ledger.missing, ledger.mismatched, ledger.report.unused
    if missing or mismatched:
        lines = mismatched[:5] + [f"{k}: not in the file" for k in missing[:5]]
        more = len(missing) + len(mismatched) - len(lines)
        raise spec.error(
            ("model", "pretrained"),
            f"the weights do not fit {spec.model.backbone}: {len(mismatched)} tensors have another shape and "
            f"{len(missing)} are missing",
            found=source
            + "\n            "
            + "\n            ".join(lines)
            + (f"\n            ... and {more} more" if more > 0 else ""),
            expected=f"a state_dict of {spec.model.backbone}",
            hint="is this a checkpoint of another architecture? For a file from another codebase set "
            "model.key_map ('order' or {regex: replacement})",
        )
    if unused:
        shown = ", ".join(unused[:6]) + (f" ... ({len(unused)} in all)" if len(unused) > 6 else "")
        raise spec.error(
            ("model", "pretrained"),
            f"{len(unused)} tensors of the weights fit nothing in the model",
            found=shown,
            expected=f"a state_dict of {spec.model.backbone}",
            hint="rename them with model.key_map {regex: replacement}, or drop them on purpose by mapping them to ''",
        )


def load_weights(
    spec: Spec,
    model: nn.Module,
    state: Mapping[str, torch.Tensor] | None,
    source: str,
    *,
    head: Iterable[str],
    inserted: Iterable[str],
    report: LoadReport,
    reset_head: bool | None = None,
    changes: Sequence[Any] = (),
    original: Mapping[str, torch.Tensor] | None = None,
) -> LoadReport:
    """Load `state` into the surgered `model`, key by key, and account for every tensor in `report`.

    Rules: a backbone key must be in the file with its shape (else SpecError: a file of another
    architecture is never half-loaded); head keys whose shape differs are re-initialised
    (num_classes changed); keys of inserted modules load when present, else they are new;
    file keys nothing used make an error (drop them on purpose with key_map {pattern: ""}).
    Keys under a module a spec entry changed (`changes`, from `plan.plan_operations`) load where
    name and shape fit, are adapted (in_chans) or re-initialised, and the file keys they leave are
    dropped, each with that entry's line; `original` is the backbone's state before surgery, what
    key_map: order pairs the file with.
    """
    target = model.state_dict()
    reset_head = spec.model.reset_head if reset_head is None else reset_head
    head, inserted, changes = tuple(head), tuple(inserted), tuple(changes)

    def change_of(key: str) -> Any:
        found = [c for c in changes if key.startswith(c.path + ".")]
        return max(reversed(found), key=lambda c: len(c.path)) if found else None  # deepest, then latest

    if state is None:
        report.new = [k for k in target if _under(k, inserted)]
        report.random = [k for k in target if not _under(k, inserted)]
        return report
    report.source = source
    paired = original if changes and original is not None else target  # key_map: order pairs with the backbone's keys
    state, report.mapped = map_keys(
        spec,
        state,
        paired,
        skip=[k for k in paired if _under(k, inserted)],
        head=[k for k in paired if _under(k, head)],
    )
    ledger = _Ledger(report)
    for key, tensor in target.items():
        is_inserted, is_head = _under(key, inserted), _under(key, head)
        change = None if is_inserted else change_of(key)
        resampled = (
            None if change is not None or is_inserted else _resampled_position(model, key, state.get(key), tensor)
        )
        if resampled is not None:
            ledger.updates[key], report.adapted[key] = resampled
            ledger.used.add(key)
        elif change is not None:
            _account_changed(ledger, key, tensor, state.get(key), change, reset_head and is_head)
        else:
            _account_plain(ledger, key, tensor, state.get(key), inserted=is_inserted, head=is_head, reset=reset_head)
    for key in state:  # file keys a changed module has no place for: dropped, with the entry's line
        change = change_of(key) if key not in ledger.used else None
        if change is not None:
            ledger.used.add(key)
            report.dropped[key] = f"{change.label}: " + (
                f"shape {list(state[key].shape)} in the weights, {list(target[key].shape)} here"
                if key in target
                else "the new module has no such tensor"
            )
    report.unused = [k for k in state if k not in ledger.used]
    _check_everything_fits(spec, source, ledger)
    # load_state_dict(strict=True) with every key present: nothing can be skipped silently
    full = dict(target)
    full.update(ledger.updates)
    model.load_state_dict(full, strict=True)
    return report
