"""Recorded statistics across torch.distributed ranks: one step's row (``record(reduce=True)``) or a whole
History, merged so that every rank holds the statistics of the global batch.

Per layer the rows hold mergeable moments (per-channel mean and population variance with the values per
channel, min, max, nonzero and NaN/Inf counts), so the merge is exact up to their float32 storage: Chan's
update folded over ranks in rank order (every rank computes bit-identical results), extremes over ranks,
counts added. Quantiles, BatchNorm buffers, flags and call counts are rank 0's: DDP treats rank 0's buffers as
authoritative, and a rank-0 checkpoint saves them. Each function is a collective inside a process group of
more than one rank (every rank must call it, in the same order) and a no-op outside one."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bnaudit.distributed import dist_info, gather_checked, is_active
from bnaudit.recording.history import History
from bnaudit.recording.layout import EXTRA, Layout, merge_blocks

__all__ = ["merge_ranks", "reduce_history", "reduce_row"]


def merge_ranks(vals: np.ndarray, ints: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Merge every rank's rows: ``vals`` (W, rows, width), ``ints`` (W, rows, layers, 2). Returns the merged
    values (rows, width) and ints (rows, layers, 2): rank 0's, with every layer's moments, extremes and
    counts merged over ranks and its values per channel summed."""
    merged = vals[0].astype(np.float64).copy()
    out_ints = ints[0].copy()
    for k, (name, c, _, _) in enumerate(layout.layers):
        pos = layout.at[name][1]
        cols = slice(pos, pos + 2 * c + EXTRA)
        ns = np.where(ints[..., k, 0] > 0, ints[..., k, 1], 0)  # (W, rows)
        n, block = ns[0].astype(np.float64), vals[0][:, cols].astype(np.float64)
        for r in range(1, len(vals)):
            n, block = merge_blocks(n, block, ns[r], vals[r][:, cols].astype(np.float64))
        merged[:, cols] = block
        out_ints[:, k, 1] = ns.sum(0)
    return merged, out_ints


def reduce_row(values: np.ndarray, ints: np.ndarray, layout: Layout, group: Any = None) -> None:
    """Reduce one recorded step across ranks, in place (the recorder calls it every step with ``reduce=True``).

    Args:
        values: this rank's row (``layout.width`` values), changed in place.
        ints: its ``(layers, 2)`` calls / values-per-channel table, changed in place.
        layout: the row's layout.
        group: process group, or None for the default.

    Raises:
        DistributedError: ranks recorded different layers or channel counts in this step.
    """
    if not is_active(group):
        return
    local = torch.from_numpy(np.concatenate([values.astype(np.float64), ints.reshape(-1).astype(np.float64)]))
    parts = gather_checked(local, layout, "set of layers in this step", group)
    w = len(values)
    vals = np.stack([p[:w].numpy() for p in parts])[:, None]
    table = np.stack([p[w:].numpy().reshape(ints.shape) for p in parts])[:, None].round().astype(np.int64)
    merged, out_ints = merge_ranks(vals, table, layout)
    values[:] = merged[0]
    ints[:] = out_ints[0]


def reduce_history(history: History, group: Any = None) -> History:
    """A new History whose every row describes the global batch (a collective, on demand).

    Every rank calls it with its own history, recorded over the same steps and layers (``rec.step()`` on
    every rank); rows are merged as ``reduce_row`` merges them. Every rank gets the same result.

    Args:
        history: this rank's History (not changed).
        group: process group, or None for the default.

    Returns:
        The reduced History (a copy outside a process group).

    Raises:
        DistributedError: ranks recorded different steps, layers or channel counts.
    """
    payload = history.to_payload()
    if not is_active(group):
        return History.from_payload(payload)
    segs = payload["segments"]
    key = (list(payload["steps"]), [(s["layers"], s["bns"], tuple(s["values"].shape)) for s in segs])
    pieces = [torch.zeros(0, dtype=torch.float64)]
    for s in segs:
        pieces += [s["values"].double().reshape(-1), s["ints"].double().reshape(-1)]
    parts = gather_checked(torch.cat(pieces), key, "history (steps, layers or channel counts)", group)
    offset = 0
    for s in segs:
        v_shape, i_shape = tuple(s["values"].shape), tuple(s["ints"].shape)
        nv, ni = int(np.prod(v_shape)), int(np.prod(i_shape))
        vals = np.stack([p[offset: offset + nv].numpy().reshape(v_shape) for p in parts])
        ints = np.stack([p[offset + nv: offset + nv + ni].numpy().reshape(i_shape) for p in parts])
        offset += nv + ni
        layout = Layout(tuple(tuple(x) for x in s["layers"]), tuple(tuple(b) for b in s["bns"]))
        merged, out_ints = merge_ranks(vals, ints.round().astype(np.int64), layout)
        s["values"] = torch.from_numpy(merged.astype(np.float32))
        s["ints"] = torch.from_numpy(out_ints)
    world = dist_info(group).world_size
    payload["notes"] = [*payload["notes"], f"reduced across {world} ranks (BatchNorm buffers, quantiles, calls: rank 0's)"]
    return History.from_payload(payload)
