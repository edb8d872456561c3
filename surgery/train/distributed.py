"""Data-parallel training over the processes `torchrun` starts.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `setup` joins the process group with nccl on
CUDA and gloo on the CPU, one process per device. ``train.batch_size`` is per process: the
global batch is ``batch_size x WORLD_SIZE``, as torchrun users expect (lrs are not rescaled).
Only rank 0 writes files and prints; every rank reads the same batches a single process would
split between them (`surgery.data.make_loader`).

What keeps the ranks identical, and checks it:

- DistributedDataParallel all-reduces only the parameters that required grad when it wrapped
  the model; a group unfrozen later would train on each rank's own gradients and drift apart
  silently. `DataParallel` therefore re-wraps the model whenever the trainable set changes
  (it compares ``requires_grad`` on every call, so no caller can forget). The optimizer holds
  the same parameter objects throughout, so its state survives a re-wrap.
- BatchNorm statistics move per process during an epoch (unless ``train.sync_bn``);
  `sync_buffers` averages them at its end, as timm's ``distribute_bn`` does. Statistics of
  frozen norms never move and are left alone.
- `diverged` compares a bit-exact checksum of every parameter and buffer across ranks; the
  training loop calls it after every epoch and stops loudly when ranks differ.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import Origin, UsageError

T = TypeVar("T")


class RanksDiverged(RuntimeError):
    """Ranks hold different parameters or buffers: a bug, never a user mistake."""


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) outside torchrun."""
    try:
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise UsageError(
            "RANK, LOCAL_RANK and WORLD_SIZE must be integers",
            origin=Origin.env("RANK"),
            found=f"RANK={os.environ.get('RANK')!r} LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}",
            hint="start distributed runs with torchrun, which sets them",
        ) from None
    return rank, local_rank, world_size


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run; every collective is a no-op when `world_size` is 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (cuda for nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce `tensor` in place (sum over ranks) and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, by rank, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and give every rank its result, or raise its exception on every
        rank: a failure on rank 0 (a read-only folder, a full disk) must not leave the others
        waiting forever in their next collective."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - whatever fails, send a plain copy instead
        return False
    return True


def setup(device: torch.device) -> Distributed:
    """Join torchrun's process group (once per process); outside torchrun, a world of one.

    Raises:
        UsageError: distributed training asked for on a device other than CUDA or the CPU.
    """
    rank, local_rank, world_size = world_from_env()
    if world_size <= 1:
        return Distributed(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        elif device.type == "cpu":
            dist.init_process_group("gloo")
        else:
            raise UsageError(
                f"distributed training runs on CUDA (nccl) or the CPU (gloo), not {device.type}",
                origin=Origin.env("WORLD_SIZE", os.environ.get("WORLD_SIZE")),
                found=str(device),
                expected="cuda, cpu or auto (train.device or --device)",
                hint="--device cpu, or run a single process",
            )
    return Distributed(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def teardown() -> None:
    """Leave the process group (the end of `surgery run` under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the wrapper
def unused_parameters(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Trainable parameters that get no gradient from a forward pass on `x`.

    DDP must be told (``find_unused_parameters``) or it waits for their gradients forever. The
    probe changes nothing: BatchNorm statistics are restored and the RNG state is forked.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    buffers = [b.clone() for b in model.buffers()]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        out = model(x[:2])
        loss = sum(o.float().sum() for o in (out if isinstance(out, (tuple, list)) else [out]))
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    return [n for (n, _), g in zip(named, grads) if g is None]


class DataParallel:
    """Calls the model through DistributedDataParallel, re-wrapped whenever the trainable set changes.

    The key is ``requires_grad`` of every parameter, read on every call (a few hundred bools),
    so unfreezing a group is only ``requires_grad_(True)`` for the caller, as in a single
    process. With no trainable parameter (every group frozen) the model runs unwrapped.
    With `compile`, the wrapped module is compiled (dynamo splits DDP graphs at bucket
    boundaries), again only when the trainable set changes.

    Attributes:
        find_unused: the last wrap's setting; compilations: how many times it was compiled.
    """

    def __init__(self, model: nn.Module, env: Distributed, *, compile: bool | str = False) -> None:
        self.model = model
        self.env = env
        self.backend = None if not compile else ("inductor" if compile is True else str(compile))
        self.ddp: nn.Module | None = None
        self.compilations = 0
        self.find_unused = False
        self._key: tuple[bool, ...] | None = None
        self._fn: Callable[[torch.Tensor], torch.Tensor] = model

    def key(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def __call__(self, x: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
        """The model's output; ``sync=False`` (an accumulation step) skips the gradient all-reduce
        of this forward's backward pass (DDP's ``no_sync``: the gradients stay local and are
        reduced, summed, with those of the window's last batch)."""
        key = self.key()
        if key != self._key:
            self._wrap(key, x)
        if sync or self.ddp is None:
            return self._fn(x)
        with self.ddp.no_sync():  # DDP reads the flag in forward, which prepares the backward's reduction
            return self._fn(x)

    def _wrap(self, key: tuple[bool, ...], x: torch.Tensor) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module: nn.Module = self.model
        self.ddp = None
        if any(key):
            # every rank must agree, or DDP's reducers would wait for different gradients
            unused = torch.tensor([len(unused_parameters(self.model, x))], device=self.env.device)
            self.find_unused = bool(self.env.max_(unused).item())
            device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            # Ranks already agree: `broadcast_state` ran once at the start and every update since
            # was all-reduced. No init sync, which would also overwrite rank-local BatchNorm
            # statistics restored mid-epoch; buffers are averaged at the end of each epoch
            # (sync_buffers) rather than broadcast before every forward.
            self.ddp = module = DDP(
                self.model,
                device_ids=device_ids,
                init_sync=False,
                forward_sync_buffers=False,
                find_unused_parameters=self.find_unused,
            )
        if self.backend is not None:
            torch._dynamo.reset()
            self._fn = torch.compile(module, backend=self.backend)
            self.compilations += 1
        else:
            self._fn = module
        self._key = key


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm, keeping every parameter and buffer object (and so every name,
    optimizer entry and group)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --------------------------------------------------------------------------- buffers and checks
@torch.no_grad()
def broadcast_state(module: nn.Module, env: Distributed) -> None:
    """Rank 0's parameters and buffers to every rank (what DDP's own init sync would do, once)."""
    if env.enabled:
        for tensor in module.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, src=0)


def trained_norms(model: nn.Module) -> list[str]:
    """Paths of normalization modules whose running statistics move in training: in train mode
    (frozen norms are in eval mode), tracking statistics, and not already synchronised."""
    return [
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and m.training
        and m.track_running_stats
        and not isinstance(m, nn.SyncBatchNorm)
    ]


@torch.no_grad()
def sync_buffers(modules: Iterable[nn.Module], paths: Sequence[str], env: Distributed) -> None:
    """Average the floating-point buffers under `paths` across ranks, in each of `modules` (the
    model and its EMA copy, which share module paths)."""
    if not env.enabled or not paths:
        return
    for module in modules:
        tensors = [b for path in paths for b in module.get_submodule(path).buffers() if b.is_floating_point()]
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1).double() for t in tensors]).to(env.device)
        env.sum_(flat).div_(env.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two int64 checksums of each tensor's bits (sum, and sum weighted by position): equal for
    bit-identical tensors, different for any drift training can produce. Computed where the
    tensors live; only 16 bytes per tensor cross between ranks."""
    out = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        bits = flat.contiguous().view(_BITS[flat.element_size()]).to(torch.int64)
        position = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
        out.append(torch.stack([bits.sum(), (bits * position).sum()]))
    return torch.stack(out) if out else torch.zeros(0, 2, dtype=torch.int64)


def diverged(states: dict[str, torch.Tensor], env: Distributed) -> list[str]:
    """Names of the tensors (parameters and buffers) that differ between ranks; [] when all agree."""
    if not env.enabled:
        return []
    names = list(states)
    mine = fingerprint([states[n] for n in names]).to(env.device)
    every = [torch.empty_like(mine) for _ in range(env.world_size)]
    dist.all_gather(every, mine)
    return [n for i, n in enumerate(names) if any(not torch.equal(other[i], every[0][i]) for other in every[1:])]


__all__ = [
    "Distributed",
    "DataParallel",
    "RanksDiverged",
    "setup",
    "teardown",
    "world_from_env",
    "unused_parameters",
    "convert_sync_bn",
    "broadcast_state",
    "trained_norms",
    "sync_buffers",
    "fingerprint",
    "diverged",
]
