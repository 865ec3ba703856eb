"""Helpers for auditing inside a torch.distributed process group: who am I, merge what every rank measured,
and read what a DistributedDataParallel wrapper knows.

``comm`` holds the process-group primitives (rank and world, checked all-gathers, every rank's BatchNorm
buffers), ``merge`` turns per-rank statistics and reports into those of the global batch, and ``ddp`` reads
DDP wrappers. Running a whole audit on every rank is an API function, ``bnaudit.inspect_distributed``; nothing
here imports the audit, the loaders or the recorder."""

from __future__ import annotations

from bnaudit.distributed.comm import (
    BNBuffers,
    DistInfo,
    DistributedError,
    all_gather_vectors,
    dist_info,
    gather_bn_buffers,
    gather_checked,
    is_active,
    is_main_process,
)
from bnaudit.distributed.ddp import DDPFacts, current_ddp_facts, ddp_context, ddp_facts, unwrap_ddp
from bnaudit.distributed.merge import merge_channel_stats, merge_reports, reduce_channel_stats, reduce_moments

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
    "is_active",
    "is_main_process",
    "merge_channel_stats",
    "merge_reports",
    "reduce_channel_stats",
    "reduce_moments",
    "unwrap_ddp",
]
