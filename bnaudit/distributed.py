"""Helpers for auditing inside a torch.distributed process group: who am I, merge what every rank measured,
and let rank 0 report.

Every rank measures its own share of the global batch; these functions turn per-rank summaries into the
summary of the whole global batch, exactly: counts add, means and M2 (sums of squared deviations) merge with
Chan, Golub & LeVeque's parallel update in rank order (so every rank computes bit-identical results), minima
and maxima reduce with MIN/MAX, zero and NaN/Inf counts add. Everything that is not an additive statistic
(BatchNorm running buffers, quantiles) takes rank 0's value, the copy DDP treats as authoritative and the one a
rank-0 checkpoint saves. ``gather_bn_buffers`` collects every rank's running statistics for BN402;
``inspect_distributed`` runs ``bnaudit.inspect`` on every rank and returns the merged report on one rank.

Every function here is a collective when a process group of more than one rank is active: all ranks must
call it, in the same order, with the same layer layout, or the group waits until its timeout. Outside a group
(or with one rank) they are cheap no-ops that return the local result. Collectives run on the CPU for gloo
and on the current CUDA device for NCCL; each call sends a few small messages (a layout check, then the
data), never activations."""

from __future__ import annotations

import contextvars
import copy
import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bnaudit.errors import BnauditError
from bnaudit.stats import ChannelStats, Moments, chan_merge

if TYPE_CHECKING:
    from bnaudit.findings import Report

__all__ = [
    "BNBuffers",
    "DDPFacts",
    "DistInfo",
    "DistributedError",
    "all_gather_vectors",
    "current_ddp_facts",
    "ddp_context",
    "ddp_facts",
    "dist_info",
    "gather_bn_buffers",
    "gather_checked",
    "inspect_distributed",
    "is_active",
    "is_main_process",
    "merge_channel_stats",
    "merge_reports",
    "reduce_channel_stats",
    "reduce_moments",
    "unwrap_ddp",
]


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


def _dist():
    import torch.distributed as dist

    return dist


def dist_info(group: Any = None) -> DistInfo:
    """Describe the process group (default: the world group).

    Args:
        group: a process group, or None for the default one.

    Returns:
        DistInfo; ``initialized`` False and world size 1 outside torch.distributed.
    """
    dist = _dist()
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


def _comm_device(group: Any, like: torch.device | None = None) -> torch.device:
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
    dist = _dist()
    home = t.device
    dev = _comm_device(group, home)
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


# -- merging moments --------------------------------------------------------------------------------------------


def _chan_over_ranks(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge (W, C) per-rank counts/means/M2 into (C,) in rank order; ranks with count 0 add nothing."""
    n_acc = torch.zeros_like(n[0])
    mean_acc = torch.zeros_like(mean[0])
    m2_acc = torch.zeros_like(m2[0])
    for r in range(n.shape[0]):
        nb = n[r]
        has = nb > 0
        mb = torch.where(has, mean[r], torch.zeros_like(mean[r]))
        m2b = torch.where(has, m2[r], torch.zeros_like(m2[r]))
        tot, mu, sq = chan_merge(n_acc, mean_acc, m2_acc, nb, mb, m2b)
        safe = tot > 0
        mean_acc = torch.where(safe, mu, mean_acc)
        m2_acc = torch.where(safe, sq, m2_acc)
        n_acc = tot
    return n_acc, mean_acc, m2_acc


def merge_channel_stats(parts: Sequence[ChannelStats]) -> ChannelStats:
    """``stats.ChannelStats`` of several disjoint samples (ranks, workers) merged into those of their union,
    in order, with Chan's update (parts with ``n == 0`` add nothing). No collectives.

    Raises:
        ValueError: no parts, or channel counts differ.
    """
    if not parts:
        raise ValueError("no statistics to merge")
    if len({p.channels for p in parts}) > 1:
        raise ValueError(f"channel counts differ: {sorted({p.channels for p in parts})}")
    acc = None
    for p in parts:
        if p.n <= 0:
            continue
        acc = p if acc is None else acc.merge(p)
    return acc if acc is not None else parts[0]


def _cs_fields(st: ChannelStats) -> list[torch.Tensor]:
    return [st.mean, st.m2, st.min, st.max, st.nonzero]


def reduce_channel_stats(stats: ChannelStats, group: Any = None) -> ChannelStats:
    """The ``stats.ChannelStats`` of the global batch from every rank's statistics of its share (a collective).

    Mean and M2 merge with Chan's update in rank order, min/max take the extremes, counts add (whatever
    shapes this ChannelStats gives its extremes and counts: per channel or whole-tensor).

    Args:
        stats: this rank's statistics (``stats.channel_stats``).
        group: process group, or None for the default.

    Returns:
        The merged statistics (float64, on ``stats``' device); ``stats`` itself outside a process group.

    Raises:
        DistributedError: ranks hold different channel counts.
    """
    if not is_active(group):
        return stats
    home = stats.mean.device
    f = torch.float64
    fields = _cs_fields(stats)
    shapes = [tuple(t.shape) for t in fields]
    nf = stats.nonfinite if stats.nonfinite is not None else torch.tensor(-1.0, device=home)
    vec = torch.cat([torch.tensor([float(stats.n)], dtype=f, device=home), *(t.to(f).reshape(-1) for t in fields),
                     nf.to(home, f).reshape(1)])
    parts = gather_checked(vec, ("channel_stats", shapes), "channel count", group)
    rebuilt = []
    for p in (q.to(home) for q in parts):
        at, got = 1, []
        for shape in shapes:
            k = math.prod(shape)
            got.append(p[at : at + k].reshape(shape))
            at += k
        rebuilt.append(ChannelStats(int(p[0].item()), *got, None if p[at] < 0 else p[at]))
    return merge_channel_stats(rebuilt)


def reduce_moments(moments: Moments, group: Any = None) -> Moments:
    """A new ``stats.Moments`` summarising the union of every rank's data (a collective).

    count/mean/M2 are all-gathered and merged with Chan's update in rank order; min and max are
    all-reduced with MIN and MAX; zero, non-finite and element counts are summed. The input is not changed.

    Args:
        moments: this rank's Moments (a rank that saw no data takes part with nothing to add).
        group: process group, or None for the default.

    Returns:
        The merged Moments on ``moments``' device (a copy of ``moments`` outside a process group).

    Raises:
        DistributedError: ranks saw different channel counts.
    """
    if not is_active(group):
        return copy.deepcopy(moments)
    dist = _dist()
    f = torch.float64
    seen = moments.mean is not None
    home = moments.mean.device if seen else torch.device("cpu")
    if seen:
        c = moments.mean.numel()
        count = moments.count
        count = count.to(f).reshape(-1).expand(c) if isinstance(count, torch.Tensor) else torch.full((c,), float(count), dtype=f, device=home)
        vec = torch.cat([count.to(home), moments.mean.to(f), moments.m2.to(f)])
        extras = torch.tensor([float(moments.zeros), float(moments.nonfinite), float(moments.numel)], dtype=f)
        lo_hi = torch.tensor([float(moments.min), -float(moments.max)], dtype=f)
    else:
        vec = torch.zeros(0, dtype=f)
        extras = torch.tensor([0.0, 0.0, 0.0], dtype=f)
        lo_hi = torch.tensor([float("inf"), float("inf")], dtype=f)
    parts = all_gather_vectors(vec, group)
    widths = {p.numel() for p in parts if p.numel()}
    if len(widths) > 1:
        raise DistributedError(
            f"ranks recorded different channel counts {sorted(w // 3 for w in widths)}; reduce the same layer on every rank"
        )
    dev = _comm_device(group, home)
    lo_hi, extras = lo_hi.to(dev), extras.to(dev)
    dist.all_reduce(lo_hi, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(extras, op=dist.ReduceOp.SUM, group=group)
    out = Moments(channel_dim=moments.channel_dim, dtype=moments.dtype)
    present = [p.to(home) for p in parts if p.numel()]
    if not present:
        return out
    c = present[0].numel() // 3
    table = torch.stack(present)
    n, mean, m2 = _chan_over_ranks(table[:, :c], table[:, c : 2 * c], table[:, 2 * c :])
    uniform = bool((n == n[0]).all())
    out.count = float(n[0]) if uniform else n.to(moments.dtype)
    out.mean, out.m2 = mean.to(moments.dtype), m2.to(moments.dtype)
    out.min = torch.tensor(float(lo_hi[0]), dtype=moments.dtype, device=home)
    out.max = torch.tensor(-float(lo_hi[1]), dtype=moments.dtype, device=home)
    out.zeros = torch.tensor(float(extras[0]), dtype=moments.dtype, device=home)
    out.nonfinite = torch.tensor(float(extras[1]), dtype=moments.dtype, device=home)
    out.numel = float(extras[2])
    return out


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
        dev = _comm_device(group, flat[0].device if flat else None)
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


# -- DDP wrappers ---------------------------------------------------------------------------------------------------


def _is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap_ddp(model: Any) -> Any:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if _is_ddp(model) else model


@dataclass(frozen=True)
class DDPFacts:
    """What a live DistributedDataParallel wrapper says about BatchNorm, read without copying it.

    Attributes:
        forward_sync_buffers: whether DDP broadcasts rank 0's buffers at every forward (``broadcast_buffers``
            before torch 2.13).
        has_sync_bn_at_wrap: whether the model held SyncBatchNorm when DDP wrapped it (DDP logs it then), or
            None when unknown.
        device_type: the wrapped module's device type at wrap time (``cpu``, ``cuda``).
        sync_bn_layers: names (inside the wrapper) of SyncBatchNorm layers it holds now.
    """

    forward_sync_buffers: bool
    has_sync_bn_at_wrap: bool | None
    device_type: str
    sync_bn_layers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def converted_after_wrap(self) -> bool:
        """SyncBatchNorm layers exist now that DDP did not see when it wrapped the model."""
        return bool(self.sync_bn_layers) and self.has_sync_bn_at_wrap is False


def ddp_facts(model: Any) -> DDPFacts | None:
    """Read a DistributedDataParallel wrapper's buffer and SyncBatchNorm facts (None for other modules).

    Must be given the live wrapper: a deep copy rebuilds DDP's construction log and loses
    ``has_sync_bn_at_wrap``.
    """
    if not _is_ddp(model):
        return None
    sync = tuple(n for n, m in model.module.named_modules() if isinstance(m, nn.SyncBatchNorm))
    at_wrap: bool | None = None
    try:
        at_wrap = bool(model._get_ddp_logging_data().get("has_sync_bn"))
    except Exception:  # noqa: BLE001 - a private API; without it the fact is just unknown
        at_wrap = None
    forward_sync = getattr(model, "forward_sync_buffers", None)
    if forward_sync is None:
        forward_sync = getattr(model, "broadcast_buffers", True)
    return DDPFacts(bool(forward_sync), at_wrap, str(getattr(model, "device_type", "cpu")), sync)


_DDP_FACTS: contextvars.ContextVar[DDPFacts | None] = contextvars.ContextVar("bnaudit_ddp_facts", default=None)


@contextmanager
def ddp_context(facts: DDPFacts | None) -> Iterator[None]:
    """Make a live DDP wrapper's facts visible to the BN4xx rules while an audit of its inner module runs
    (the audit works on a copy, and a copy of a DDP wrapper no longer knows what it saw at wrap time)."""
    token = _DDP_FACTS.set(facts)
    try:
        yield
    finally:
        _DDP_FACTS.reset(token)


def current_ddp_facts() -> DDPFacts | None:
    """The DDP facts set by ``ddp_context`` for the audit running now, if any."""
    return _DDP_FACTS.get()


# -- rank 0 reports ---------------------------------------------------------------------------------------------


def merge_reports(report: Report, group: Any = None, dst: int = 0) -> Report | None:
    """Gather every rank's Report on rank ``dst`` and merge their findings (a collective).

    A finding every rank produced appears once; one that only some ranks produced (a data rule on one rank's
    shard) appears once per distinct message with ``evidence["ranks"]`` naming them.

    Args:
        report: this rank's Report.
        group: process group, or None for the default.
        dst: the rank that reports.

    Returns:
        The merged Report on ``dst`` (``report`` itself outside a process group); None on other ranks.
    """
    from bnaudit.findings import Finding, sort_findings

    info = dist_info(group)
    if not info.active:
        return report
    gathered: list[Any] = [None] * info.world_size
    _dist().all_gather_object(gathered, [f.to_dict() for f in report.findings], group=group)
    if info.rank != dst:
        return None
    seen: dict[tuple, tuple[dict, list[int]]] = {}
    for rank, findings in enumerate(gathered):
        for d in findings:
            key = (d["code"], d["layer"], d["message"])
            seen.setdefault(key, (d, []))[1].append(rank)
    merged = []
    for d, ranks in seen.values():
        f = Finding.from_dict(d)
        if len(ranks) < info.world_size:
            f = replace(f, evidence={**dict(f.evidence), "ranks": ranks})
        merged.append(f)
    meta = {**dict(report.meta), "world_size": info.world_size, "backend": info.backend, "reported_by_rank": dst}
    return replace(report, findings=sort_findings(merged), meta=meta)


def inspect_distributed(model: Any, data: Any = None, *, group: Any = None, dst: int = 0, **kwargs: Any) -> Report | None:
    """Run ``bnaudit.inspect`` on every rank of a process group and return the merged report on rank ``dst``.

    Call it on every rank with the same arguments (each rank passes its own data shard). A
    DistributedDataParallel wrapper is unwrapped, and what it knows (buffer broadcasting, SyncBatchNorm seen
    at wrap time) is handed to BN402/BN403. The model and data are loaded, and the model run on the first
    batch, before the audit's collectives start; if that fails on any rank, every rank raises instead of
    waiting for the failed one.

    Args:
        model: this rank's model, its DDP wrapper, or a MODEL spec (never modified).
        data: this rank's data (any DATA spec or object ``bnaudit.inspect`` takes).
        group: process group for the checks and the merge (the rules use the default group).
        dst: the reporting rank.
        **kwargs: passed to ``bnaudit.inspect`` (select, ignore, rule_config, batch_size, steps, ...).

    Returns:
        The merged Report on ``dst``, None on the other ranks (the local report outside a process group).

    Raises:
        DistributedError: another rank could not load or run its model and data (names the rank and error).
        BnauditError: this rank's own model, data or options are unusable.
    """
    from bnaudit.api import inspect

    facts = ddp_facts(model)
    kwargs = dict(kwargs)
    error: BaseException | None = None
    try:
        model, data, kwargs = _preflight(unwrap_ddp(model), data, kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    info = dist_info(group)
    if info.active:
        # The rules' collectives only line up if every rank runs the same rules: compare what decides that.
        plan = {
            "data": data is not None,
            "select": sorted(kwargs.get("select") or []),
            "ignore": sorted(kwargs.get("ignore") or []),
        }
        status: list[Any] = [None] * info.world_size
        mine = (None if error is None else f"{type(error).__name__}: {error}", plan)
        _dist().all_gather_object(status, mine, group=group)
        failed = [(r, s[0]) for r, s in enumerate(status) if s[0] is not None]
        if failed and error is None:
            r, s = failed[0]
            raise DistributedError(f"the audit could not start on rank {r}: {s}; fix that rank's model or data")
        odd = [r for r, s in enumerate(status) if s[1] != status[0][1]]
        if odd and error is None:
            raise DistributedError(
                f"rank {odd[0]} runs a different audit than rank 0 ({status[odd[0]][1]} vs {status[0][1]}); give every "
                "rank data and the same select/ignore"
            )
    if error is not None:
        raise error
    with ddp_context(facts):
        report = inspect(model, data, **kwargs)
    return merge_reports(report, group=group, dst=dst)


def _preflight(model: Any, data: Any, kwargs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Load the model, data and predict function once and run the model on the first batch (in eval mode,
    on a copy), so that errors surface before any collective; returns what ``inspect`` then takes as is."""
    from bnaudit.audit import model_dtype, resolve_device
    from bnaudit.loading import load_data, load_model, load_predict

    loaded = load_model(model, weights=kwargs.pop("weights", None), trust_pickle=kwargs.pop("trust_pickle", False))
    source = load_data(data, namespace=loaded.namespace, batch_size=kwargs.get("batch_size", 32),
                       input_key=kwargs.get("input_key"))
    kwargs["predict"] = load_predict(kwargs.get("predict"), loaded.namespace)
    kwargs.setdefault("name", loaded.spec)
    if source is not None:
        dev = resolve_device(kwargs.get("device", "cpu"))
        probe = copy.deepcopy(loaded.module).to(dev).eval()
        batch = source.first(device=dev, dtype=model_dtype(probe))
        with torch.no_grad():
            try:
                probe(batch.inputs)
            except Exception as exc:
                from bnaudit.errors import DataError
                from bnaudit.loading.specs import describe_exception

                raise DataError(
                    f"{loaded.spec}: the model rejected the first batch of its data ({describe_exception(exc)}); "
                    "check that this rank's data matches the model"
                ) from exc
    return loaded.module, source, kwargs
