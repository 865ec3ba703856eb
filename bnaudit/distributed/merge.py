"""Merging what every rank measured into the numbers of the whole global batch, exactly: counts add, means
and M2 (sums of squared deviations) merge with Chan, Golub & LeVeque's parallel update in rank order (so every
rank computes bit-identical results), minima and maxima reduce with MIN/MAX, zero and NaN/Inf counts add.
Everything that is not an additive statistic (BatchNorm running buffers, quantiles) takes rank 0's value, the
copy DDP treats as authoritative and the one a rank-0 checkpoint saves. ``merge_reports`` gathers every rank's
findings on the reporting rank.

The ``reduce_*`` functions and ``merge_reports`` are collectives (see ``comm``); ``merge_channel_stats`` is
not."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from bnaudit.distributed.comm import (
    DistributedError,
    all_gather_vectors,
    comm_device,
    dist_info,
    gather_checked,
    is_active,
    torch_dist,
)
from bnaudit.stats import ChannelStats, Moments, chan_merge

if TYPE_CHECKING:
    from bnaudit.findings import Report

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
    dist = torch_dist()
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
    dev = comm_device(group, home)
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
    torch_dist().all_gather_object(gathered, [f.to_dict() for f in report.findings], group=group)
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
