"""Process-group primitives: who am I (``dist_info``), all-gathers of vectors with a layout check
(``gather_checked``), and every rank's BatchNorm running buffers (``gather_bn_buffers``).

Every function here is a collective when a process group of more than one rank is active: all ranks must
call it, in the same order, with the same layer layout, or the group waits until its timeout. Outside a group
(or with one rank) they are cheap no-ops that return the local result. Collectives run on the CPU for gloo
and on the current CUDA device for NCCL; each call sends a few small messages (a layout check, then the
data), never activations."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit.distributed.ddp import unwrap_ddp
from bnaudit.errors import BnauditError


class DistributedError(BnauditError):
    """Ranks disagree about what they measured (different layers or layouts), or a rank failed while the
    others were auditing. Raised on every rank, so no rank is left waiting in a collective."""


# -- who am I -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """The process group as this process sees it.

    Attributes:
        available: torch was built with torch.distributed.
        initialized: a default process group exists.
        world_size: ranks in ``group`` (1 when not initialized).
        rank: this process's rank in ``group`` (0 when not initialized).
        backend: ``gloo``, ``nccl``... or None when not initialized.
    """

    available: bool
    initialized: bool
    world_size: int = 1
    rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """True when there is more than one rank to reduce over."""
        return self.initialized and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torch_dist() -> Any:
    """``torch.distributed``, imported when first needed."""
    import torch.distributed as dist

    return dist


def dist_info(group: Any = None) -> DistInfo:
    """Describe the process group (default: the world group).

    Args:
        group: a process group, or None for the default one.

    Returns:
        DistInfo; ``initialized`` False and world size 1 outside torch.distributed.
    """
    dist = torch_dist()
    if not dist.is_available():
        return DistInfo(available=False, initialized=False)
    if not dist.is_initialized():
        return DistInfo(available=True, initialized=False)
    return DistInfo(
        available=True,
        initialized=True,
        world_size=dist.get_world_size(group),
        rank=dist.get_rank(group),
        backend=str(dist.get_backend(group)),
    )


def is_active(group: Any = None) -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist_info(group).active


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 of ``group`` and outside torch.distributed (the process that reports)."""
    return dist_info(group).is_main


def comm_device(group: Any, like: torch.device | None = None) -> torch.device:
    """Where collective buffers must live: NCCL only moves CUDA tensors; gloo is safest with CPU ones."""
    backend = (dist_info(group).backend or "").lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or like is None:
        return torch.device("cpu")
    return like


def _layout_hash(key: Any) -> int:
    # crc32 of the repr: stable across processes (Python's hash() is salted per process).
    return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF


def all_gather_vectors(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's 1-D tensor, in rank order, on ``t``'s device; ranks may send different lengths.

    Two collectives: the lengths, then the vectors padded to the longest.

    Args:
        t: a 1-D tensor (any dtype; float64 is the usual).
        group: process group, or None for the default.

    Returns:
        One tensor per rank (a one-element list outside a process group).
    """
    info = dist_info(group)
    if not info.active:
        return [t.reshape(-1).clone()]
    dist = torch_dist()
    home = t.device
    dev = comm_device(group, home)
    flat = t.reshape(-1).to(dev)
    n = torch.tensor([flat.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=flat.dtype, device=dev)
    padded[: flat.numel()] = flat
    out = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(out, padded, group=group)
    return [o[:k].to(home) for o, k in zip(out, lengths)]


def gather_checked(payload: torch.Tensor, key: Any, what: str, group: Any = None) -> list[torch.Tensor]:
    """All ranks' payloads (as float64, in rank order), after checking that every rank describes the same
    layout (``key``, any value with a stable ``repr``).

    Raises:
        DistributedError: a rank's key or payload length differs from rank 0's (``what`` names it).
    """
    info = dist_info(group)
    head = torch.tensor([float(_layout_hash(key)), float(payload.numel())], dtype=torch.float64, device=payload.device)
    parts = all_gather_vectors(torch.cat([head, payload.reshape(-1).to(torch.float64)]), group)
    heads = [(int(p[0].item()), int(p[1].item())) for p in parts]
    if len(set(heads)) > 1:
        odd = next(r for r, h in enumerate(heads) if h != heads[0])
        raise DistributedError(
            f"rank {odd} of {info.world_size} recorded a different {what} than rank 0; every rank must run the same "
            "model and call it on the same layers (call the same audit on every rank)"
        )
    return [p[2:] for p in parts]


# -- BatchNorm buffers across ranks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BNBuffers:
    """One BatchNorm layer's running statistics on every rank (row r = rank r).

    Attributes:
        mean: ``(world, C)`` running means.
        var: ``(world, C)`` running variances.
        num_batches_tracked: ``(world,)`` counters.
        eps: the layer's eps.
    """

    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: np.ndarray
    eps: float


def _tracked_bns(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from bnaudit.layers import is_batchnorm

    for name, m in model.named_modules():
        if name and is_batchnorm(m) and isinstance(getattr(m, "running_mean", None), torch.Tensor):
            yield name, m


def gather_bn_buffers(model: nn.Module, group: Any = None) -> dict[str, BNBuffers]:
    """Every BatchNorm layer's running mean/var and counter, from every rank (a collective).

    Args:
        model: this rank's model (only read; a DDP wrapper is unwrapped).
        group: process group, or None for the default.

    Returns:
        Layer name -> BNBuffers with one row per rank (one row outside a process group).

    Raises:
        DistributedError: ranks hold different BatchNorm layers or channel counts.
    """
    model = unwrap_ddp(model)
    bns = list(_tracked_bns(model))
    key = [(name, int(m.running_mean.numel())) for name, m in bns]
    with torch.no_grad():
        flat = [
            t
            for _, m in bns
            for t in (m.running_mean.reshape(-1), m.running_var.reshape(-1),
                      (m.num_batches_tracked if m.num_batches_tracked is not None else torch.tensor(-1)).reshape(1))
        ]
        dev = comm_device(group, flat[0].device if flat else None)
        local = torch.cat([t.detach().to(dev, torch.float64) for t in flat]) if flat else torch.zeros(0, dtype=torch.float64, device=dev)
    parts = gather_checked(local, key, "set of BatchNorm layers", group) if is_active(group) else [local]
    table = np.stack([p.cpu().numpy() for p in parts])
    out: dict[str, BNBuffers] = {}
    at = 0
    for name, m in bns:
        c = int(m.running_mean.numel())
        out[name] = BNBuffers(table[:, at : at + c], table[:, at + c : at + 2 * c], table[:, at + 2 * c], float(m.eps))
        at += 2 * c + 1
    return out
