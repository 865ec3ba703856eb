"""Recording activation statistics across a user's own training steps: ``bnaudit.record``.

Public API (stable; other modules and helpers build on these exact names)::

    with bnaudit.record(model, *, layers=None, per_channel=True, every=1, units=None,
                        quantiles=(0.15, 0.5, 0.85), chunk=256, reduce=False, group=None) as rec:
        for x, y in loader:              # the user's loop, unchanged
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            rec.step()                   # marks the end of one training step
    h = rec.history                      # History
    h.layers                             # recorded layer names, in first-call order
    h.steps                              # np.ndarray of the recorded step numbers (0-based)
    h.series(layer, stat)                # (steps,) or (steps, C) array; stats: STATS below
    h.layer(layer)                       # dict stat -> array, every stat of one layer
    h.bn_layers                          # every BatchNorm layer of the model (recorded whatever `layers` says)
    h.bn_modes(layer)                    # BNModes(steps, training, num_batches_tracked, requires_grad, updated)
    h.updated                            # (steps,) bool: did any parameter change during the step (optimizer ran)
    h.to_json(path) / h.to_csv(path) / h.save(path);  History.load(path)

What is recorded, per selected module and recorded step: ``mean``, ``var`` (population), ``std``, ``min``,
``max``, ``zero_frac`` (exact zeros), ``nonfinite_frac`` (NaN/Inf), ``count`` (values per channel in the
step) and ``calls``; with ``per_channel=True`` also ``channel_mean`` / ``channel_var`` / ``channel_std``
(``(steps, C)``); for watched ``units`` the ``quantiles`` of each unit's values within the step
(``(steps, Q, U)``). Normalization layers are measured on their *input* (a train-mode BatchNorm's input
statistics are its batch statistics); Linear/Conv layers and activations on their *output*. For every
BatchNorm layer of the model, every recorded step: ``running_mean``, ``running_var``,
``num_batches_tracked`` (as they are at the end of the step), its ``training`` flag and whether its affine
parameters ``requires_grad``: ``bn_modes(layer)`` returns those mode series (rule BN307 reads them), and
``measures.batch_stats_from_buffers`` recovers each step's batch mean/variance from the running buffers alone.

Cost model. Reductions run on the tensor's device, under no autograd, in a fixed handful of kernels per
tensor (two-pass per-channel mean and M2, min/max, nonzero count; for a tensor whose channels come last,
(N, C) or (N, L, F), the mean and M2 come from torch's own per-channel moments kernel, the one BatchNorm uses,
in one call). A tensor of more than 65536 values is reduced in its hook, while it is still hot in cache,
straight into a statistics buffer the layer keeps (a Conv output that feeds a BatchNorm is reduced once for
both). A smaller one is only held (a detached view, no copy) until ``step()``, which concatenates held tensors
of one batch and trailing size (any widths) along their channels, in runs of up to 262144 values (1 MB of
float32, a core's L2 here), and reduces each run at once: for small tensors the per-call cost, not
the arithmetic, is what counts. At most 4M values are held per step; past that, tensors are reduced in their
hook. Temporaries go to scratch buffers that the recorder keeps until it exits (about two copies of the
largest tensor reduced in a hook, and of one run): a fresh large temporary costs page faults that outweigh the
arithmetic. ``step()`` then writes every result into one row of the preallocated history, on CPU directly or
from an accelerator in one transfer: no ``.item()`` per module. On CPU outside a process group, steps holding
fewer than 131072 values are reduced in batches of up to 32 steps (512K held values): their held tensors wait,
and the batch is reduced at once when it is full, when the row structure changes, when ``history`` is read,
and at the end of the block. For small tensors this turns a dozen calls per step into a dozen per batch, and
the batch's rows are written in one assignment per step; the waiting tensors stay alive until then (at most
512K values, 2 MB in float32, and as much again for the batch before while the recorder's thread reduces it;
the batch's scratch buffers take as much again, twice). Once steps repeat
one structure (every layer held, called once), a hook whose tensor has last step's shape, dtype and device
holds it as last step's was held without deciding anything anew, and ``step()`` reuses last step's plan
without rebuilding its key: on a small MLP those decisions cost as much as the hooks themselves. NaN/Inf show up in the channel means and are counted exactly only when they are
there (on CPU, where reading a value costs no transfer, the hook reads the range of large tensors to decide).
A held tensor that a hooked ``inplace=True`` module is about to overwrite is reduced just before it runs; one
changed in place where no hook sees it (a functional in-place op) is detected by its version counter, skipped
for that step, and reduced in its hook from then on.

Threads. Tensors under 1M values, and held steps, are reduced with torch's intra-op threads switched off for
the call: for them the fork and join across threads costs more than it saves (a 10-layer MLP at 2 threads:
overhead 60% without, about 20% with). Larger ones use torch's threads. When torch uses fewer threads than the
process may run on (``torch.set_num_threads(1)`` on a multi-core machine, say), a CPU step holding at least
131072 values is reduced on a thread of the recorder's own while the next step runs: ``step()`` hands the held
tensors over and returns, and the next ``step()``, any read of ``history`` and the end of the block wait for it
(an error there is raised at that point). Those tensors then live until that thread is done with them, a
little into the next step. Batches of smaller steps go to that thread too, one batch at a time (the next
batch waits for the one before, not each step for its batch). A tensor changed in place after ``step()``,
before it was reduced, is skipped for that step with a note. Inside a process group (``reduce=True``) and on accelerators everything is reduced in
``step()``.
``benchmarks/record_overhead.py`` measures what this costs against an unhooked step.

Memory. History lives in host buffers preallocated in chunks of up to ``chunk`` rows (16, 32, ... then
``chunk``); untouched pages cost nothing until written. It grows by ``History.bytes_per_step`` per recorded
step and never by an activation: per recorded layer 4 x (2C + 4) bytes (C = channels; 1 with
``per_channel=False``) + 16 for its call/count entry, per BatchNorm 4 x (2C + 1) + 2 (4 + 2 with
``per_channel=False``: its counter and flags, not its running buffers), per watched layer 4 x Q x U, + 9 per
step. A ResNet-18-like net's per-channel history (61 layers, 20 BatchNorms) is about 130 KB a step, 65 MB over
500 steps: pass ``every=k`` to keep one step in k (the other steps cost one Python check per hook),
``per_channel=False`` for whole-tensor summaries (about 2 KB a step), or ``layers=`` to watch fewer modules.

Steps. ``rec.step()`` ends a step. If it is never called, every forward pass inside the ``with`` block is
merged into one row, written when the block exits (one summary of the whole block). Several calls of a module
within one step are merged exactly (Chan's update; quantiles describe the first call).

torch.compile. Hooks added after a compiled model's first call never fire (dynamo skips module-hook guards by
default). ``record`` watches for that: when a step ends in which parameters changed (an optimizer step ran)
or a BatchNorm's ``num_batches_tracked`` moved, yet not one hook has fired since recording began, it raises
``RecordingError`` naming the fix (enter ``record`` before the first compiled call, or record the uncompiled
module). It never silently records nothing. A ``torch.compile(model)`` wrapper is unwrapped (``_orig_mod``),
so layer names are the uncompiled model's.

Distributed. Inside a torch.distributed process group, ``reduce=True`` merges every rank's statistics once
per recorded step (means and variances by Chan's update, extremes and counts over all ranks), so every rank
keeps the statistics of the global batch; every rank must call ``step()`` together (one collective per
recorded step). Outside a process group it does nothing.

On exit, normal or by exception, every hook handle is removed and every held tensor released; the model's
parameters, buffers, flags and hook dictionaries are as they were (the recorder only reads)."""

from __future__ import annotations

import array
import atexit
import fnmatch
import json
import math
import os
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit.errors import BnauditError, UsageError
from bnaudit.io import atomic_write, atomic_write_text
from bnaudit.layers import is_activation, is_batchnorm, is_conv, is_norm, is_weight_layer
from bnaudit.stats import ChannelStats, StatsBuffer, _ab, as_3d, channel_stats, count_nonfinite, group_stats

__all__ = ["STATS", "BNModes", "History", "Recorder", "RecordingError", "default_layers", "record"]

HISTORY_SCHEMA = "bnaudit.history/1"
SCALAR_STATS = ("mean", "var", "std", "min", "max", "zero_frac", "nonfinite_frac", "count", "calls")
CHANNEL_STATS = ("channel_mean", "channel_var", "channel_std")
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
STATS = (*SCALAR_STATS, *CHANNEL_STATS, *BN_STATS, "quantiles")
# Channels live last for these (token layouts (N, L, F)); first after the batch for conv-style layers.
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.Bilinear)
# Tensors up to this many values are held until step() and reduced together (per-kernel launch cost
# dominates for them); larger ones are reduced in the hook, while they are still hot in cache.
_GROUP_MAX = 1 << 16
# At most this many values are held per step (a bound on what holding can keep alive); past it, tensors are
# reduced in their hook.
_HOLD_MAX = 1 << 22
# Held tensors of a step are reduced in runs of at most this many values (1 MB of float32, a core's L2 here):
# few calls, yet each run's passes stay in one core's cache. Measured on the 10-layer MLP: on the recorder's
# thread 1.13-1.15x against 1.17-1.25x in one run; inline at 2 threads 1.27-1.31x against 1.34-1.38x in runs
# of 65536.
_RUN_MAX = 1 << 18
# With a core to spare (torch using fewer threads than the process may run on), a step holding at least this
# many values is reduced on the recorder's thread while the next step runs. Below that the hand-over costs
# more than it saves (both threads then contend for Python's lock).
_ASYNC_MIN = 1 << 17
# Otherwise (on CPU, outside a process group) steps are reduced in batches of up to this many steps or values.
_BATCH_STEPS = 32
_BATCH_VALUES = 1 << 19
# Smaller tensors are reduced on one thread: for them torch's fork/join across threads costs more than it
# saves (measured: 10-layer MLP, batch 128, 2 threads: recording overhead 60% -> about 20%).
_PARALLEL_MIN = 1 << 20


class RecordingError(BnauditError):
    """Recording cannot measure what it was asked to: hooks that never fire on a compiled model, or
    ``layers``/``units`` that name no module."""


@dataclass(frozen=True)
class BNModes:
    """The mode series of one BatchNorm layer, one entry per recorded step (read at the end of the step).

    Attributes:
        steps: the recorded step numbers.
        training: the layer's ``training`` flag.
        num_batches_tracked: its counter (-1 when it tracks no running statistics).
        requires_grad: whether its affine weight/bias require grad (False when it has none).
        updated: whether any model parameter changed during the step (an optimizer step ran).
    """

    steps: np.ndarray
    training: np.ndarray
    num_batches_tracked: np.ndarray
    requires_grad: np.ndarray
    updated: np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Storage: rows of one structure form a segment; a descriptor says where each value sits in its rows.


@dataclass(frozen=True)
class _Cols:
    """Columns of one recorded layer in a segment's rows."""

    channels: int
    mean: int  # first of `channels` columns of per-channel means
    m2: int  # first of `channels` columns of per-channel M2 (sum of squared deviations)
    min: int
    max: int
    nonzero: int
    nonfinite: int
    q: int = -1  # first of `qu` quantile columns, -1 when none
    qu: int = 0
    ext: int = 1  # columns of min/max/nonzero: 1, or one per channel (reduced when read)


@dataclass(frozen=True)
class _Desc:
    """A row structure: the recorded layers present (in ``ints`` order) and BatchNorm layers (in ``flags``
    order), with their columns."""

    width: int
    slots: tuple[tuple[str, _Cols], ...]
    bns: tuple[tuple[str, int, int, int, int], ...]  # name, channels, running_mean, running_var, nbt columns

    def __post_init__(self) -> None:
        object.__setattr__(self, "slot_at", {n: (k, c) for k, (n, c) in enumerate(self.slots)})
        object.__setattr__(self, "bn_at", {b[0]: (k, b) for k, b in enumerate(self.bns)})


class _Segment:
    """Rows recorded under one descriptor, in preallocated chunks that grow 16, 32, ... up to ``chunk``."""

    def __init__(self, desc: _Desc, chunk: int, ints: np.ndarray | None = None):
        self.desc, self.chunk = desc, chunk
        self.values: list[np.ndarray] = []  # (rows, width) float32, zero until written
        self.ints: list[np.ndarray] = []  # (rows, slots, 2) int64: calls, values per channel
        self.flags: list[np.ndarray] = []  # (rows, bns, 2) bool: training, requires_grad
        self.rows = 0
        self._cap = 0
        self._at = 0  # the next row's index in the last chunk
        self._fill = ints  # every row's ints, when the structure fixes them: written once per chunk

    def next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.rows == self._cap:
            size = min(self.chunk, max(16, self._cap))
            d = self.desc
            self.values.append(np.zeros((size, d.width), dtype=np.float32))
            ints = np.empty((size, len(d.slots), 2), dtype=np.int64)
            if self._fill is not None:
                ints[:] = self._fill
            self.ints.append(ints)
            self.flags.append(np.empty((size, len(d.bns), 2), dtype=bool))
            self._cap += size
            self._at = 0
        r = self._at
        self._at += 1
        self.rows += 1
        return self.values[-1][r], self.ints[-1][r], self.flags[-1][r]

    def take(self, which: str) -> np.ndarray:
        """All rows of ``values``, ``ints`` or ``flags`` as one array."""
        chunks = getattr(self, which)
        if not chunks:
            shape = {"values": (0, self.desc.width), "ints": (0, len(self.desc.slots), 2),
                     "flags": (0, len(self.desc.bns), 2)}[which]
            return np.zeros(shape, dtype={"values": np.float32, "ints": np.int64, "flags": bool}[which])
        return np.concatenate(chunks, axis=0)[: self.rows]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for group in (self.values, self.ints, self.flags) for a in group)


# ----------------------------------------------------------------------------------------------------------
# History


class History:
    """A compact per-step table of recorded statistics, with one accessor per question.

    Built by ``Recorder``; loaded by ``History.load``. Arrays returned are fresh float64 numpy arrays, one row
    per recorded step; a layer not called in a step has NaN there and ``calls`` 0.
    """

    def __init__(self, chunk: int = 256):
        self.chunk = chunk
        self._segments: list[_Segment] = []
        self._steps = array.array("q")  # 8 bytes a step
        self._updated = bytearray()  # 1 byte a step
        self.info: dict[str, dict[str, Any]] = {}  # layer -> type, where, channel_dim, units
        self.bn_info: dict[str, dict[str, Any]] = {}  # BN layer -> type, channels, momentum, eps, initial buffers
        self.quantile_levels: tuple[float, ...] = ()
        self.notes: list[str] = []
        self._sync: Any = None  # while recording: waits until every step taken so far is written

    # -- writing (Recorder) --
    def _append(self, desc: _Desc, step: int, updated: bool, ints: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A new row for ``step``: its values (zeros), ints and flags to fill in (``ints``: every row's, when
        the structure fixes them, then already filled in)."""
        if not self._segments or self._segments[-1].desc is not desc:
            self._segments.append(_Segment(desc, self.chunk, ints))
        self._steps.append(step)
        self._updated.append(updated)
        return self._segments[-1].next_row()

    # -- reading --
    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> np.ndarray:
        """The recorded step numbers (how many ``step()`` calls came before the row was taken)."""
        return np.frombuffer(self._steps, dtype=np.int64).copy() if self._steps else np.zeros(0, np.int64)

    @property
    def updated(self) -> np.ndarray:
        """Per recorded step: whether any parameter changed during it (an optimizer step ran)."""
        return np.frombuffer(bytes(self._updated), dtype=bool).copy() if self._updated else np.zeros(0, bool)

    @property
    def layers(self) -> list[str]:
        """Recorded layer names, in the order they were first called."""
        return list(self.info)

    @property
    def bn_layers(self) -> list[str]:
        """Every BatchNorm layer of the model (their buffers and modes are recorded whatever ``layers`` says)."""
        return list(self.bn_info)

    @property
    def bytes_per_step(self) -> int:
        """Host bytes one recorded step keeps under the latest row structure."""
        if not self._segments:
            return 0
        d = self._segments[-1].desc
        return 4 * d.width + 16 * len(d.slots) + 2 * len(d.bns) + 9

    @property
    def nbytes(self) -> int:
        """Host bytes allocated for the history so far (whole chunks)."""
        return sum(s.nbytes for s in self._segments) + 9 * len(self._steps)

    def _check_layer(self, layer: str, bn: bool = False) -> None:
        known = self.bn_info if bn else self.info
        if layer not in known:
            what = "BatchNorm layer" if bn else "recorded layer"
            names = ", ".join(list(known)[:8]) or "none"
            raise UsageError(f"no {what} {layer!r} in this history (have: {names})")

    def _gather(self, fn, width: int | None) -> np.ndarray:
        """Concatenate ``fn(segment, values, ints)`` over segments; NaN where it returns None."""
        if self._sync is not None:
            self._sync()
        parts = []
        for seg in self._segments:
            got = fn(seg)
            shape = (seg.rows,) if width is None else (seg.rows, width)
            if got is None:
                parts.append(np.full(shape, np.nan))
                continue
            got = np.asarray(got, dtype=np.float64)
            if width is not None and got.shape[1] != width:  # channel count changed: pad with NaN
                pad = np.full(shape, np.nan)
                k = min(width, got.shape[1])
                pad[:, :k] = got[:, :k]
                got = pad
            parts.append(got)
        if not parts:
            return np.zeros((0,) if width is None else (0, width))
        return np.concatenate(parts, axis=0)

    def _channels(self, layer: str) -> int:
        return max((seg.desc.slot_at[layer][1].channels for seg in self._segments if layer in seg.desc.slot_at), default=0)

    def series(self, layer: str, stat: str) -> np.ndarray:
        """One statistic of one layer over the recorded steps.

        Args:
            layer: a recorded layer (``layers``) or, for ``running_mean``/``running_var``/
                ``num_batches_tracked``, a BatchNorm layer (``bn_layers``).
            stat: one of ``STATS``: ``mean``, ``var``, ``std``, ``min``, ``max``, ``zero_frac``,
                ``nonfinite_frac``, ``count``, ``calls``, ``num_batches_tracked`` (shape ``(steps,)``);
                ``channel_mean``, ``channel_var``, ``channel_std``, ``running_mean``, ``running_var``
                (``(steps, C)``); ``quantiles`` (``(steps, Q, U)``, watched units only).

        Returns:
            A float64 array (NaN where the layer was not called in a step).

        Raises:
            UsageError: an unknown layer or statistic.
        """
        if stat not in STATS:
            raise UsageError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
        if stat in BN_STATS:
            return self._bn_series(layer, stat)
        self._check_layer(layer)
        if stat == "quantiles":
            return self._quantiles(layer)
        c = self._channels(layer)

        def pick(seg: _Segment):
            at = seg.desc.slot_at.get(layer)
            if at is None:
                return None
            k, cols = at
            v = seg.take("values")
            n = seg.take("ints")[:, k, :].astype(np.float64)
            calls, count = n[:, 0], n[:, 1]
            if stat == "calls":
                return calls
            if stat == "count":
                return count
            numel = count * cols.channels
            with np.errstate(invalid="ignore", divide="ignore"):
                e = cols.ext
                if stat == "min":
                    out = v[:, cols.min: cols.min + e].min(axis=1).astype(np.float64)
                elif stat == "max":
                    out = v[:, cols.max: cols.max + e].max(axis=1).astype(np.float64)
                elif stat == "zero_frac":
                    out = 1.0 - v[:, cols.nonzero: cols.nonzero + e].astype(np.float64).sum(axis=1) / numel
                elif stat == "nonfinite_frac":
                    out = v[:, cols.nonfinite] / numel
                else:
                    cm = v[:, cols.mean: cols.mean + cols.channels].astype(np.float64)
                    cv = v[:, cols.m2: cols.m2 + cols.channels] / count[:, None]
                    out = self._from_channels(stat, cm, cv, c)
            out = np.array(out, dtype=np.float64)
            out[calls == 0] = np.nan
            return out

        width = c if stat in CHANNEL_STATS else None
        got = self._gather(pick, width)
        if stat in ("calls", "count"):
            got = np.nan_to_num(got, nan=0.0)
        return got

    @staticmethod
    def _from_channels(stat: str, cm: np.ndarray, cv: np.ndarray, c: int) -> np.ndarray:
        if stat == "channel_mean":
            return cm
        if stat == "channel_var":
            return cv
        if stat == "channel_std":
            return np.sqrt(cv)
        # Whole-layer moments from per-channel ones: every channel holds the same number of values, so the
        # layer mean is the mean of channel means and the variance adds the spread between channels.
        mean = cm.mean(axis=1)
        if stat == "mean":
            return mean
        var = cv.mean(axis=1) + cm.var(axis=1)
        return var if stat == "var" else np.sqrt(var)

    def _bn_series(self, layer: str, stat: str) -> np.ndarray:
        self._check_layer(layer, bn=True)
        c = int(self.bn_info[layer]["channels"])

        def pick(seg: _Segment):
            at = seg.desc.bn_at.get(layer)
            if at is None or not c:
                return None
            _, (_, ch, rm, rv, nbt) = at
            if stat == "num_batches_tracked":
                return None if nbt < 0 else seg.take("values")[:, nbt]
            if not ch:  # recorded with per_channel=False: no per-channel buffers
                return None
            v = seg.take("values")
            return v[:, rm: rm + ch] if stat == "running_mean" else v[:, rv: rv + ch]

        if stat == "num_batches_tracked":
            if not c:
                return np.full(len(self), -1.0)
            return self._gather(pick, None)
        return self._gather(pick, c)

    def _quantiles(self, layer: str) -> np.ndarray:
        units = self.info[layer].get("units") or ()
        qu = len(self.quantile_levels) * len(units)
        if not qu:
            raise UsageError(f"layer {layer!r} has no watched units; pass units={{{layer!r}: [0]}} to record()")

        def pick(seg: _Segment):
            at = seg.desc.slot_at.get(layer)
            if at is None or at[1].q < 0:
                return None
            cols = at[1]
            return seg.take("values")[:, cols.q: cols.q + cols.qu]

        flat = self._gather(pick, qu)
        return flat.reshape(len(flat), len(self.quantile_levels), len(units))

    def layer(self, layer: str) -> dict[str, np.ndarray]:
        """Every statistic of one recorded layer as ``stat -> array`` (``quantiles`` only when watched)."""
        self._check_layer(layer)
        out = {s: self.series(layer, s) for s in (*SCALAR_STATS, *CHANNEL_STATS)}
        if self.info[layer].get("units"):
            out["quantiles"] = self.series(layer, "quantiles")
        return out

    def bn_modes(self, layer: str) -> BNModes:
        """The mode series of one BatchNorm layer (for BN307 and friends): its training flag,
        num_batches_tracked, whether its affine parameters require grad, and whether the step updated
        parameters.

        Raises:
            UsageError: ``layer`` is not a BatchNorm layer of the recorded model.
        """
        self._check_layer(layer, bn=True)

        def flag(j: int):
            def pick(seg: _Segment):
                at = seg.desc.bn_at.get(layer)
                return None if at is None else seg.take("flags")[:, at[0], j]
            return pick

        training = self._gather(flag(0), None)
        req = self._gather(flag(1), None)
        nbt = self.series(layer, "num_batches_tracked")
        return BNModes(
            steps=self.steps,
            training=np.nan_to_num(training, nan=0).astype(bool),
            num_batches_tracked=np.nan_to_num(nbt, nan=-1).astype(np.int64),
            requires_grad=np.nan_to_num(req, nan=0).astype(bool),
            updated=self.updated,
        )

    # -- export --
    def to_dict(self) -> dict[str, Any]:
        """Everything as plain lists (the JSON export's shape; NaN as None)."""
        layers = {}
        for name in self.layers:
            entry: dict[str, Any] = dict(self.info[name])
            for stat, arr in self.layer(name).items():
                entry[stat] = _jsonable(arr)
            layers[name] = entry
        bns = {}
        for name in self.bn_layers:
            modes = self.bn_modes(name)
            info = {k: v for k, v in self.bn_info[name].items() if not k.startswith("initial_")}
            bns[name] = {
                **info,
                "training": modes.training.tolist(),
                "requires_grad": modes.requires_grad.tolist(),
                "num_batches_tracked": modes.num_batches_tracked.tolist(),
                "running_mean": _jsonable(self.series(name, "running_mean")),
                "running_var": _jsonable(self.series(name, "running_var")),
            }
        return {
            "schema": HISTORY_SCHEMA,
            "steps": self.steps.tolist(),
            "updated": self.updated.tolist(),
            "quantile_levels": list(self.quantile_levels),
            "notes": list(self.notes),
            "layers": layers,
            "batchnorm": bns,
        }

    def to_json(self, path: str | Path, *, force: bool = False) -> Path:
        """Write ``to_dict()`` as JSON.

        Raises:
            OutputError: the file exists without ``force``, or its folder is missing.
        """
        return atomic_write_text(path, json.dumps(self.to_dict()), force=force)

    def to_csv(self, path: str | Path, *, force: bool = False) -> Path:
        """Write whole-layer statistics as a long CSV, one row per layer and step: ``step, layer, calls,
        count, mean, var, min, max, zero_frac, nonfinite_frac``, then one row per BatchNorm layer and step with
        ``training, num_batches_tracked, requires_grad`` (per-channel series go to JSON or .pt).

        Raises:
            OutputError: the file exists without ``force``, or its folder is missing.
        """
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = ("calls", "count", "mean", "var", "min", "max", "zero_frac", "nonfinite_frac")
        w.writerow(("step", "layer", *cols, "training", "num_batches_tracked", "requires_grad"))
        steps = self.steps
        for name in self.layers:
            data = [self.series(name, c) for c in cols]
            for i, step in enumerate(steps):
                w.writerow((int(step), name, *(_fmt(d[i]) for d in data), "", "", ""))
        for name in self.bn_layers:
            m = self.bn_modes(name)
            for i, step in enumerate(steps):
                w.writerow((int(step), name, *([""] * len(cols)), int(m.training[i]), int(m.num_batches_tracked[i]),
                            int(m.requires_grad[i])))
        return atomic_write_text(path, buf.getvalue(), force=force)

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the history as a ``.pt`` file that ``History.load`` reads back (tensors and plain types
        only, so it loads with ``weights_only=True``).

        Raises:
            OutputError: the file exists without ``force``, or its folder is missing.
        """
        payload = _to_payload(self)
        return atomic_write(path, lambda tmp: torch.save(payload, tmp), force=force)

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a history written by ``save``.

        Raises:
            UsageError: the file is missing or is not a bnaudit history.
        """
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: no such history file; write one with History.save()")
        try:
            payload = torch.load(p, weights_only=True)
        except Exception as exc:
            raise UsageError(f"{p}: not a readable bnaudit history ({type(exc).__name__}); write one with "
                             "History.save()") from exc
        if not isinstance(payload, dict) or payload.get("schema") != HISTORY_SCHEMA:
            raise UsageError(f"{p}: not a bnaudit history file (schema {HISTORY_SCHEMA} expected)")
        return _from_payload(payload)


def _fmt(v: float) -> str:
    return "" if v is None or math.isnan(float(v)) else repr(float(v))


def _jsonable(arr: np.ndarray) -> Any:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 1:
        return [None if not math.isfinite(v) else v for v in a.tolist()]
    return [_jsonable(r) for r in a]


def _to_payload(h: History) -> dict[str, Any]:
    if h._sync is not None:
        h._sync()
    segs = []
    for s in h._segments:
        d = s.desc
        segs.append({
            "width": d.width,
            "slots": [(n, list(vars(c).values())) for n, c in d.slots],
            "bns": [list(b) for b in d.bns],
            "values": torch.from_numpy(s.take("values").copy()),
            "ints": torch.from_numpy(s.take("ints").copy()),
            "flags": torch.from_numpy(s.take("flags").copy()),
        })
    bn_info = {k: {kk: (torch.from_numpy(vv) if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()}
               for k, v in h.bn_info.items()}
    return {
        "schema": HISTORY_SCHEMA,
        "chunk": h.chunk,
        "steps": list(h._steps),
        "updated": list(h._updated),
        "info": h.info,
        "bn_info": bn_info,
        "quantile_levels": list(h.quantile_levels),
        "notes": list(h.notes),
        "segments": segs,
    }


def _from_payload(p: dict[str, Any]) -> History:
    h = History(chunk=int(p["chunk"]))
    h.info = {k: dict(v) for k, v in p["info"].items()}
    h.bn_info = {k: {kk: (vv.numpy() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
                 for k, v in p["bn_info"].items()}
    h.quantile_levels = tuple(p["quantile_levels"])
    h.notes = list(p["notes"])
    i = 0
    for s in p["segments"]:
        desc = _Desc(int(s["width"]), tuple((n, _Cols(*c)) for n, c in s["slots"]), tuple(tuple(b) for b in s["bns"]))
        values, ints, flags = s["values"].numpy(), s["ints"].numpy(), s["flags"].numpy()
        for r in range(len(values)):
            v, n, f = h._append(desc, int(p["steps"][i]), bool(p["updated"][i]))
            v[:], n[:], f[:] = values[r], ints[r], flags[r]
            i += 1
    return h


# ----------------------------------------------------------------------------------------------------------
# Recorder


class _Slot:
    """One recorded module: what it measures and what the current step has collected."""

    __slots__ = (
        "acc",
        "buf",
        "calls",
        "cd",
        "eager",
        "fast",
        "fast_n",
        "fast_numel",
        "fast_shape",
        "index",
        "key",
        "module",
        "n",
        "name",
        "note",
        "quant",
        "stash",
        "stash_ver",
        "units",
        "where",
    )

    def __init__(self, name: str, module: nn.Module, where: str, units: tuple[int, ...]):
        self.name, self.module, self.where, self.units = name, module, where, units
        self.cd: Any = "auto"  # channel dim: "auto" until the first call, then an int or None (whole tensor)
        self.calls = 0
        self.n = 0
        self.stash: torch.Tensor | None = None  # (A, C, B) detached view of this step's tensor
        self.stash_ver = 0
        self.acc: ChannelStats | None = None  # already reduced statistics (merged calls, in-place inputs)
        self.buf: StatsBuffer | None = None  # where its first reduction of a step is written
        self.quant: torch.Tensor | None = None
        self.eager = False  # its tensor is changed in place where no hook sees it: reduce at hook time
        # The hooks' fast path: while every step has the same structure, a tensor of the same shape, dtype and
        # device as last step's (``fast``) is held as last step's was, without re-deciding how.
        self.key: tuple | None = None  # (shape, dtype, device) of the tensor held this step
        self.fast: tuple | None = None  # last step's key, when the fast path is armed
        self.fast_numel = self.fast_n = 0
        self.fast_shape: torch.Size | None = None  # the (A, C, B) view to hold, or None: the tensor as it is
        self.note = ""
        self.index = -1


class _Group:
    """Held tensors reduced together at step(): one batch and trailing size, layout, dtype and device."""

    __slots__ = ("shape", "slots", "views")

    def __init__(self, slots: list[_Slot], shape: tuple[int, ...], views: tuple[torch.Tensor, ...]):
        self.slots, self.shape, self.views = slots, shape, views  # views: the 5 result slices of the raw row


class _Plan:
    """How a step with one row structure is computed and written (made once, reused every such step)."""

    __slots__ = ("accs", "batch", "bns", "desc", "device", "groups", "held", "host", "ints", "nf_zero", "order", "quant", "r",
                 "raw", "raw_tail", "row_tail", "spans", "tail", "threaded")

    def __init__(self, desc: _Desc, order: list[_Slot], accs: list[_Slot], quant: list[_Slot],
                 bns: list[tuple[str, nn.Module]], nf_zero: int, device: torch.device | None):
        self.desc, self.order, self.accs, self.quant, self.bns = desc, order, accs, quant, bns
        self.nf_zero, self.device = nf_zero, device
        self.groups: list[_Group] = []
        self.held = 0  # values held in the groups
        self.threaded = False  # its groups are reduced on the recorder's thread
        self.batch = 1  # steps reduced together when its steps are batched
        self.ints: np.ndarray | None = None  # the (calls, values per channel) rows when every layer is held
        self.raw: torch.Tensor | None = None  # the step's results on the tensors' device
        self.host: torch.Tensor | None = None  # its host copy (accelerators only)
        self.r: np.ndarray | None = None  # the host copy as numpy
        self.tail: torch.Tensor | None = None  # the raw row after the groups, when a step writes it
        self.spans: tuple = ()
        self.row_tail = self.raw_tail = 0


class _Worker:
    """The recorder's thread: runs submitted calls one at a time, in order. ``wait`` blocks until every
    submitted call has finished and re-raises the first error one of them raised."""

    def __init__(self):
        # torch's thread count as the caller's thread sees it: the same for this thread's own reductions
        # (set from this thread, it changes nothing the caller sees).
        self._threads = torch.get_num_threads()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bnaudit-record", daemon=True)
        self._thread.start()
        _WORKERS.add(self)

    def submit(self, fn, *args) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put((fn, args))

    def wait(self) -> None:
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        _WORKERS.discard(self)

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by wait()
                if self._error is None:
                    self._error = exc
            finally:
                del item, fn, args  # release the step's tensors before reporting done
                with self._lock:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.set()


_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_workers() -> None:
    # A recorder never exited (its ``with`` block abandoned) must not leave its thread for interpreter shutdown.
    for w in list(_WORKERS):
        w.close()


def _one_thread(fn, *args):
    """``fn(*args)`` with torch's intra-op threads switched off, then given back: for the recorder's small
    reductions the fork and join across threads costs more than it saves."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _collapse(means: np.ndarray, m2s: np.ndarray, offs: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-tensor mean and M2 of each member of a group from its per-channel ones (along the last axis,
    members starting at ``offs``; ``per`` values per channel): Chan's merge over the member's channels."""
    total = means.shape[-1]
    widths = np.diff(np.append(offs, total))
    means = means.astype(np.float64)
    mu = np.add.reduceat(means, offs, axis=-1) / widths
    dev = means - np.repeat(mu, widths, axis=-1)
    return mu, np.add.reduceat(m2s.astype(np.float64), offs, axis=-1) + per * np.add.reduceat(dev * dev, offs, axis=-1)


def _span_rows(got: np.ndarray, span: tuple, dtype: np.dtype) -> np.ndarray:
    """One held group's slice of the history rows of ``n`` steps, from its per-channel results ``got`` of
    shape ``(5, n, channels)`` (``means | m2s | mins | maxes | nonzeros``): means and M2s as they are (or
    collapsed to one per member for whole-tensor rows), extremes and counts reduced to one per member."""
    _, _, total, offs, k, per = span
    rt = k if per else total  # the row's channels
    block = np.empty((got.shape[1], 2 * rt + 3 * k), dtype=dtype)
    if per:
        block[:, :k], block[:, k: 2 * k] = _collapse(got[0], got[1], offs, per)
    else:
        block[:, :total], block[:, total: 2 * total] = got[0], got[1]
    at = 2 * rt
    block[:, at: at + k] = np.minimum.reduceat(got[2], offs, axis=1)
    block[:, at + k: at + 2 * k] = np.maximum.reduceat(got[3], offs, axis=1)
    block[:, at + 2 * k:] = np.add.reduceat(got[4], offs, axis=1)
    return block


def _write_span(values: np.ndarray, span: tuple, got: np.ndarray) -> None:
    """Write one held group's results (flat ``means | m2s | mins | maxes | nonzeros``) into one history row."""
    row = _span_rows(got.reshape(5, 1, span[2]), span, values.dtype)[0]
    values[span[0]: span[0] + len(row)] = row


def _spare_core() -> bool:
    """Whether this process may run on more cores than torch's intra-op threads use (the recorder's thread
    then has one of its own; on a busy core it would only slow the training step down)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def _split(groups: Iterable[list[_Slot]], most: int) -> Iterator[list[_Slot]]:
    """Each group's members in runs of at most ``most`` values (one member may exceed it): a run's
    concatenation then stays in cache for the passes that follow it, which is worth more than the calls a
    larger run would save."""
    for members in groups:
        run: list[_Slot] = []
        size = 0
        for m in members:
            n = m.stash.numel()
            if run and size + n > most:
                yield run
                run, size = [], 0
            run.append(m)
            size += n
        if run:
            yield run


def default_layers(model: nn.Module) -> dict[str, str]:
    """The modules ``record`` hooks by default and what it measures on each: ``input`` for normalization
    layers, ``output`` for Linear/Conv layers and activations."""
    out: dict[str, str] = {}
    skip: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        if is_norm(m):
            out[name] = "input"
            skip.append(name + ".")
        elif is_weight_layer(m) or is_activation(m):
            out[name] = "output"
    return out


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    compiled = getattr(model, "_compiled_call_impl", None) is not None
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        return orig, True
    return model, compiled


def _key(x: torch.Tensor) -> tuple:
    # Identity of a tensor's values: while a stash holds the storage alive no other tensor can reuse its
    # memory, so equal pointer/shape/stride means the same data (the conv output a BatchNorm reads next).
    return (x.data_ptr(), x.shape, x.stride(), x.dtype)


class Recorder:
    """Collects statistics while the user's code runs; made by ``record``. Call ``step()`` at the end of
    each training step and read ``history`` (during or after the block)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[str] | Mapping[str, str] | None = None,
        per_channel: bool = True,
        every: int = 1,
        units: Mapping[str, int | Sequence[int]] | None = None,
        quantiles: Sequence[float] = (0.15, 0.5, 0.85),
        chunk: int = 256,
        reduce: bool = False,
        group: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise UsageError(f"record() needs an nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UsageError(f"every must be a positive integer, got {every!r}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise UsageError(f"chunk must be a positive integer, got {chunk!r}")
        qs = tuple(float(q) for q in quantiles)
        if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
            raise UsageError(f"quantiles must be numbers in [0, 1], got {list(quantiles)}")
        self.model, self.compiled = _unwrap(model)
        self.per_channel, self.every = per_channel, every
        self._whole = not per_channel  # rows keep one channel per layer: per-channel results collapsed
        self.history = History(chunk=chunk)
        self._q = qs
        self._select = self._resolve_layers(layers)
        self._units = self._resolve_units(units or {})
        self.history.quantile_levels = qs if self._units else ()
        self._slots: list[_Slot] = []
        self._handles: list[Any] = []
        self._bns = [(n, m) for n, m in self.model.named_modules() if n and is_batchnorm(m)]
        self._params = list(self.model.parameters())
        self._step = 0
        self._active = True
        self._fired_total = 0
        self._fired_step = 0
        self._last_cd: int | None = 1
        self._stashed: dict[tuple, list[_Slot]] = {}
        self._last: tuple[Any, ChannelStats] | None = None
        self._descs: dict[tuple, _Plan] = {}
        self._cache: dict[Any, torch.Tensor] = {}  # small constant tensors (zeros) by size and device
        self._versions = 0
        self._nbt = 0
        self._held = 0  # values held (not yet reduced) this step
        self._inplace = False  # the model has modules that overwrite their input (hooked before they run)
        self._open = False
        self._reduce_group = group
        self._reduce = False
        self._worker: _Worker | None = None
        self._batch: list = []  # steps waiting to be reduced together (one structure)
        self._batch_plan: _Plan | None = None
        self._step_in_flight = False  # a step handed to the recorder's thread uses the plan's own buffers
        self._fast_plan: _Plan | None = None  # the structure the hooks' fast path expects (see _Slot.fast)
        self._fast = 0  # tensors held by the fast path this step
        self._slow = False  # a hook took the general path this step
        self._async = False  # held tensors may be reduced on a thread of the recorder's own (see __enter__)
        if reduce:
            from bnaudit.distributed import is_active

            self._reduce = is_active(group)

    # -- selection --
    def _resolve_layers(self, layers: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
        defaults = default_layers(self.model)
        if layers is None:
            return defaults
        named = dict(self.model.named_modules())
        wanted: dict[str, str] = {}
        if isinstance(layers, Mapping):
            items = list(layers.items())
        else:
            items = [(p, None) for p in ([layers] if isinstance(layers, str) else layers)]
        for pattern, where in items:
            if where not in (None, "input", "output"):
                raise UsageError(f"layer {pattern!r}: measure 'input' or 'output', not {where!r}")
            hits = [n for n in named if n and (n == pattern or fnmatch.fnmatchcase(n, pattern))]
            if not hits:
                raise RecordingError(f"layers: {pattern!r} names no module of {type(self.model).__name__}; "
                                     f"names look like {', '.join(list(defaults)[:4]) or '0, 1'}")
            for n in hits:
                wanted[n] = where or defaults.get(n) or ("input" if is_norm(named[n]) else "output")
        return wanted

    def _resolve_units(self, units: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, idx in units.items():
            if name not in self._select:
                raise RecordingError(f"units: {name!r} is not a recorded layer; add it to layers= or pick one of "
                                     f"{', '.join(list(self._select)[:4])}")
            idx = (idx,) if isinstance(idx, int) else tuple(int(i) for i in idx)
            if not idx or any(i < 0 for i in idx):
                raise UsageError(f"units[{name!r}] must be channel indices >= 0, got {list(idx)}")
            if not self.per_channel:
                raise UsageError("units need per-channel recording; drop per_channel=False")
            out[name] = idx
        return out

    # -- context manager --
    def __enter__(self) -> Recorder:
        if self._open:
            raise UsageError("this Recorder is already recording; make a new one with bnaudit.record()")
        self._open = True
        named = dict(self.model.named_modules())
        try:
            for name, where in self._select.items():
                slot = _Slot(name, named[name], where, self._units.get(name, ()))
                self._slots.append(slot)
                if where == "input":
                    self._handles.append(named[name].register_forward_pre_hook(self._pre_hook(slot)))
                else:
                    self._handles.append(named[name].register_forward_hook(self._post_hook(slot)))
            # A module that overwrites its input (ReLU(inplace=True)) would change a held tensor before
            # step() reduces it: reduce that tensor just before such a module runs.
            for m in self.model.modules():
                if getattr(m, "inplace", False) is True:
                    self._handles.append(m.register_forward_pre_hook(self._inplace_hook))
                    self._inplace = True
        except BaseException:
            self._remove()
            self._open = False
            raise
        for name, m in self._bns:
            rm = getattr(m, "running_mean", None)
            c = int(rm.numel()) if isinstance(rm, torch.Tensor) else 0
            nbt = getattr(m, "num_batches_tracked", None)
            self.history.bn_info[name] = {
                "type": type(m).__name__,
                "channels": c,
                "momentum": m.momentum,
                "eps": float(m.eps),
                "initial_mean": rm.detach().cpu().double().numpy().copy() if c else None,
                "initial_var": m.running_var.detach().cpu().double().numpy().copy() if c else None,
                "initial_num_batches_tracked": int(nbt) if isinstance(nbt, torch.Tensor) else -1,
                "buffers_recorded": bool(c) and self.per_channel,
                # without weight and bias nothing of its own trains: BN307 then counts the model's steps
                "affine": isinstance(getattr(m, "weight", None), torch.Tensor)
                or isinstance(getattr(m, "bias", None), torch.Tensor),
            }
        self._versions = self._param_versions()
        self._nbt = self._bn_counter()
        # The recorder's thread reduces CPU tensors (on an accelerator the kernels are asynchronous already),
        # only on a core torch leaves free, and never inside a process group (every rank must reduce in the
        # same order as the others).
        first = next(iter(self._params), None)
        self._async = not self._reduce and (first is None or first.device.type == "cpu") and _spare_core()
        self.history._sync = self._settle
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._active:
                self._check_fired()
            if self._pending():
                if exc_type is None:
                    self._flush()
                else:
                    try:  # keep what was measured, but never mask the user's exception
                        self._flush()
                    except Exception:  # noqa: BLE001
                        pass
            if exc_type is None:
                self._settle()
        finally:
            if self._batch:  # only after an exception: keep what was measured, never mask it
                try:
                    self._drain()
                except Exception:  # noqa: BLE001, S110 - the user's exception is the one to see
                    pass
            worker, self._worker = self._worker, None
            if worker is not None:
                try:
                    worker.wait()
                except BaseException:  # noqa: BLE001 - raised above already, or the user's exception wins
                    pass
                worker.close()
            self.history._sync = None
            self._remove()
            self._stashed = {}
            self._cache = {}
            self._last = None
            for s in self._slots:
                s.stash = s.acc = s.quant = s.fast = None
            self._fast_plan, self._fast, self._slow = None, 0, False
            self._open = False

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    # -- hooks --
    def _pre_hook(self, slot: _Slot):
        def hook(module: nn.Module, args: Any) -> None:
            if self._active and args:
                x = args[0]
                if slot.fast is None or slot.stash is not None or type(x) is not torch.Tensor or not self._take(slot, x):
                    self._observe(slot, x)
        return hook

    def _post_hook(self, slot: _Slot):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active and (slot.fast is None or slot.stash is not None or type(output) is not torch.Tensor
                                 or not self._take(slot, output)):
                self._observe(slot, output[0] if isinstance(output, (tuple, list)) and output else output)
        return hook

    def _take(self, slot: _Slot, x: torch.Tensor) -> bool:
        """The fast path of a hook: hold ``x`` as last step's tensor was held, when it matches it (the same
        shape, dtype and device, room left under the held-values bound). False: take the general path."""
        if (x.shape, x.dtype, x.device) != slot.fast or self._held + slot.fast_numel > _HOLD_MAX:
            return False
        self._held += slot.fast_numel
        xd = x.detach() if slot.fast_shape is None else x.detach().reshape(slot.fast_shape)
        slot.stash, slot.stash_ver, slot.calls, slot.n = xd, xd._version, 1, slot.fast_n
        self._fired_step += 1
        self._fast += 1
        if self._inplace:
            self._track(slot, x)
        return True

    def _track(self, slot: _Slot, x: torch.Tensor) -> None:
        # Only an in-place module's pre-hook looks held tensors up by their key.
        key = _key(x)
        held = self._stashed.get(key)
        if held is None:
            self._stashed[key] = [slot]
        else:
            held.append(slot)

    def _inplace_hook(self, module: nn.Module, args: Any) -> None:
        if self._stashed and args and isinstance(args[0], torch.Tensor):
            slots = self._stashed.pop(_key(args[0]), None)
            if slots:
                self._reduce_stash(slots)

    def _channel_dim(self, slot: _Slot, x: torch.Tensor) -> int | None:
        # The layout's channel dimension, per-channel or not: whole-tensor summaries are reduced per channel
        # too (the same few calls) and collapsed on the host.
        m = slot.module
        if isinstance(m, _CHANNEL_LAST):
            cd = -1
        elif is_conv(m) or is_norm(m) or x.dim() <= 2:
            cd = 1
        else:
            # Activations and other shape-preserving modules take the layout of whatever ran before.
            cd = self._last_cd
        slot.cd = cd
        return cd

    def _observe(self, slot: _Slot, x: Any) -> None:
        self._slow = True
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        self._fired_step += 1
        cd = slot.cd
        if cd == "auto":
            cd = self._channel_dim(slot, x)
        if cd is not None:
            self._last_cd = cd
            if x.dim() < 2:
                cd = None
        xd = as_3d(x.detach(), cd)
        slot.calls += 1
        first = slot.stash is None and slot.acc is None
        if first:
            slot.n = xd.numel() if self._whole else xd.numel() // xd.shape[1]
            if slot.units:
                slot.quant = self._quantiles(slot, xd)
            n = xd.numel()
            if n <= _GROUP_MAX and not slot.eager and self._held + n <= _HOLD_MAX:
                self._held += n
                slot.stash, slot.stash_ver = xd, xd._version
                slot.key, slot.fast_numel, slot.fast_n = (x.shape, x.dtype, x.device), n, slot.n
                slot.fast_shape = None if xd.shape == x.shape else xd.shape
                if self._inplace:
                    self._track(slot, x)
                return
        elif slot.stash is not None:
            # A second call in the same step: reduce what is held, then merge this call in.
            self._reduce_stash([slot])
        acc = slot.acc
        new = self._reduce_now(x, xd, self._out(slot, xd) if acc is None else None)
        if self._whole:
            new = new.whole()
        if acc is not None and acc.channels != new.channels:
            self._make_whole(slot)
            acc, new = slot.acc, new.whole()
        slot.acc = new if acc is None else acc.merge(new)
        slot.n = slot.acc.n

    def _reduce_now(self, x: torch.Tensor, xd: torch.Tensor, out: StatsBuffer | None) -> ChannelStats:
        """Reduce a tensor in the hook, into ``out`` (the slot's own buffer, on its first call of the step)
        when given, reusing the result when the same unchanged tensor comes again (a Conv/Linear output that
        a BatchNorm reads next)."""
        key = (_key(x), x._version, xd.shape)
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        on_cpu = xd.device.type == "cpu"
        work = self._buf("work", xd)
        if xd.numel() < _PARALLEL_MIN:
            st = _one_thread(lambda: channel_stats(xd, count_nonfinite_values=not on_cpu, work=work, out=out))
        else:
            st = channel_stats(xd, count_nonfinite_values=not on_cpu, work=work, out=out)
        if on_cpu:
            # On CPU reading a scalar is a memory read, not a transfer: count NaN/Inf only when present (the
            # range is finite exactly when both extremes are, unless it overflows, which merely counts).
            if st.flat is not None:
                h, c = out.host, 2 * out.channels
                if math.isfinite(h[c + 1] - h[c]):
                    h[c + 3] = 0.0
                else:
                    h[c + 3] = float(count_nonfinite(xd))
                st.nonfinite = out.views[5]
            elif not math.isfinite((st.max - st.min).item()):
                st.nonfinite = count_nonfinite(xd)
        self._last = (key, st)
        return st

    def _out(self, slot: _Slot, xd: torch.Tensor) -> StatsBuffer:
        """The slot's own statistics buffer, (re)made for ``xd``'s channels and device."""
        buf = slot.buf
        if buf is None or buf.channels != xd.shape[1] or buf.flat.device != xd.device:
            buf = slot.buf = StatsBuffer(xd.shape[1], xd.device)
        return buf

    def _reduce_stash(self, slots: list[_Slot]) -> None:
        """Reduce the tensor held by ``slots`` now (it is about to change, or a second call came)."""
        x = slots[0].stash
        if x is None:
            return
        # Every slot holding these values (``slots`` come from one tensor's key), whichever view it holds.
        done: dict[tuple, ChannelStats] = {}
        for s in slots:
            y = s.stash
            if y is None:
                continue
            stats = done.get(y.shape)
            if stats is None:
                out = self._out(s, y) if s.acc is None else None
                stats = done[y.shape] = channel_stats(y, count_nonfinite_values=True, work=self._buf("work", y), out=out)
            mine = stats.whole() if self._whole else stats
            s.acc = mine if s.acc is None else s.acc.merge(mine)
            s.stash = None
        for key in [k for k, held in self._stashed.items() if all(s.stash is None for s in held)]:
            del self._stashed[key]

    def _make_whole(self, slot: _Slot) -> None:
        # A module called at several widths in one step (a shared activation): whole-tensor summaries.
        if slot.acc is not None:
            slot.acc = slot.acc.whole()
        slot.cd, slot.units, slot.quant = None, (), None
        if not slot.note:
            slot.note = "called at several widths; recorded as whole-tensor summaries"
            self.history.notes.append(f"{slot.name}: {slot.note}")

    def _quantiles(self, slot: _Slot, x3: torch.Tensor) -> torch.Tensor:
        if x3.dim() == 2:
            x3 = x3.unsqueeze(2)
        c = x3.shape[1]
        idx = [u for u in slot.units if u < c]
        if len(idx) < len(slot.units) and not slot.note:
            slot.note = f"units {[u for u in slot.units if u >= c]} beyond its {c} channels"
            self.history.notes.append(f"{slot.name}: {slot.note}")
        vals = x3[:, idx, :].transpose(1, 2).reshape(-1, len(idx)).float()
        limit = 16_000_000 // max(1, len(idx))  # torch.quantile's input limit
        if vals.shape[0] > limit:
            vals = vals[:: math.ceil(vals.shape[0] / limit)]
        q = torch.quantile(vals, torch.tensor(self._q, device=vals.device), dim=0)  # (Q, U')
        if len(idx) < len(slot.units):
            full = torch.full((len(self._q), len(slot.units)), float("nan"), device=vals.device)
            full[:, [slot.units.index(u) for u in idx]] = q
            q = full
        return q.reshape(-1)

    # -- steps --
    def _pending(self) -> bool:
        return any(s.calls for s in self._slots)

    def _param_versions(self) -> int:
        return sum([p._version for p in self._params])

    def _bn_counter(self) -> int:
        total = 0
        for _, m in self._bns:
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, torch.Tensor):
                total += nbt._version
        return total

    def step(self) -> None:
        """Mark the end of one training step: write the step's row (when this step is recorded) and arm
        the hooks for the next one.

        Raises:
            RecordingError: the step ran the model (parameters or BatchNorm counters moved) but not one
                hook has fired since recording began, which is what a torch.compile'd model does to hooks
                added after its first call.
            UsageError: called outside the ``with`` block.
        """
        if not self._open:
            raise UsageError("rec.step() called outside `with bnaudit.record(model) as rec:`")
        if self._active:
            self._check_fired()
            self._flush()
        else:
            self._versions, self._nbt = self._param_versions(), self._bn_counter()
        self._step += 1
        self._active = self._step % self.every == 0
        self._fired_step = 0

    def _check_fired(self) -> None:
        self._fired_total += self._fired_step
        if self._fired_total or not self._slots:
            return
        if self._param_versions() != self._versions or self._bn_counter() != self._nbt:
            hint = " (it is compiled)" if self.compiled else ""
            raise RecordingError(
                f"the model{hint} trained during step {self._step} but no recording hook fired: hooks added after a "
                "torch.compile'd model's first call never run. Enter bnaudit.record() before the first call of the "
                "compiled model, or record the uncompiled module"
            )

    def _flush(self) -> None:
        _one_thread(self._flush_step)

    def _flush_step(self) -> None:
        # At most one step's reductions are in flight on the recorder's thread: it must be done before this
        # step reuses its buffers. (A batch in flight there uses buffers of its own: see _drain.)
        if self._step_in_flight:
            self._step_in_flight = False
            self._wait()
        versions = self._param_versions()
        updated = versions != self._versions
        self._versions, self._nbt = versions, self._bn_counter()
        hist = self.history
        plan = fast = self._fast_plan
        if (plan is None or self._slow or self._fast != len(plan.order)
                or any(s.stash._version != s.stash_ver for s in plan.order)):
            plan, fast = self._find_plan(), None
        # Everything but the held groups is written now, as it is at the end of this step: layers reduced in
        # their hooks, quantiles and BatchNorm buffers are concatenated into the raw row's tail in one call.
        if plan.tail is not None:
            parts: list[torch.Tensor] = []
            for s in plan.accs:
                a = s.acc
                if a.flat is not None:  # reduced straight into a statistics buffer, laid out as the row wants
                    parts.append(a.flat)
                    continue
                nf = a.nonfinite
                parts += [a.mean, a.m2, a.min.reshape(1), a.max.reshape(1), a.nonzero.reshape(1),
                          nf.reshape(1) if nf is not None else self._zeros(1, plan.device)]
            if plan.nf_zero:
                parts.append(self._zeros(plan.nf_zero, plan.device))
            for s in plan.quant:
                parts.append(s.quant)
            for name, m in plan.bns:
                if self.per_channel:
                    parts += [m.running_mean.reshape(-1), m.running_var.reshape(-1)]
                parts.append(m.num_batches_tracked.reshape(1))
            # (every part is computed from detached tensors or buffers: no autograd to switch off)
            torch.cat(parts, out=plan.tail)
        # every layer held and called once: the counts follow from the structure, and the segment fills them in
        values, ints, flags = hist._append(plan.desc, self._step, updated, plan.ints)
        if plan.ints is None and plan.order:
            ints[:] = [(s.calls, s.n) for s in plan.order]
        for k, (_, m) in enumerate(self._bns):
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            flags[k, 0] = m.training
            flags[k, 1] = (isinstance(w, torch.Tensor) and w.requires_grad) or (isinstance(b, torch.Tensor) and b.requires_grad)
        held = [[(m.stash, m.stash_ver) for m in g.slots] for g in plan.groups]
        if fast is not None:
            for s in plan.order:  # every hook took the fast path: nothing else was collected
                s.stash, s.calls = None, 0
        else:
            if plan is not self._fast_plan:
                self._arm(plan)
            for s in self._slots:
                if s.calls:
                    s.stash = s.acc = s.quant = None
                    s.calls = s.n = 0
        self._fast, self._slow = 0, False
        self._stashed = {}
        self._last = None
        self._held = 0
        job = (held, values, ints, self._step)
        if plan.host is None and plan.tail is not None:
            # On CPU the row's tail (everything but the groups) is copied now: the raw row is reused next step.
            # (Without a tail to write, it is the grouped layers' NaN/Inf counts: zeros, as the row starts.)
            values[plan.row_tail:] = plan.r[plan.raw_tail:]
        if self._batch and self._batch_plan is not plan:
            self._drain()
        if not held:
            self._finish(plan, job, "")
        elif plan.threaded:
            # The held tensors are reduced on the recorder's thread while the next step runs; the next step()
            # waits for it, at the latest.
            self._submit(self._finish, plan, job, "async")
            self._step_in_flight = True
        elif plan.host is None and not self._reduce and plan.held < _ASYNC_MIN:
            # Small steps are reduced a batch of steps at a time: a dozen tensor operations per batch instead of
            # per step (for small tensors their call cost, not the arithmetic, is what counts).
            self._batch.append(job)
            self._batch_plan = plan
            if len(self._batch) >= plan.batch:
                self._drain()
        else:
            self._finish(plan, job, "")

    def _arm(self, plan: _Plan) -> None:
        """Arm the hooks' fast path for steps like this one when every layer of its structure was held, once,
        without quantiles (else disarm it)."""
        for s in self._slots:
            s.fast = None
        fast = plan.ints is not None and not plan.quant
        self._fast_plan = plan if fast else None
        if fast:
            for s in plan.order:
                s.fast = s.key

    def _find_plan(self) -> _Plan:
        """The plan for this step's row structure, found by a cheap key (which layers ran, and the shape each
        holds) among those made on earlier steps, or made now."""
        hist = self.history
        sig = []
        for s in self._slots:
            if not s.calls:
                continue
            x = s.stash
            if x is not None and x._version != s.stash_ver:
                # Changed in place where no hook could see it (a functional in-place op): this step's values
                # are gone; skip it for this layer and reduce it at hook time from now on.
                s.stash, s.eager, s.calls, s.quant, x = None, True, 0, None, None
                hist.notes.append(f"step {self._step}: {s.name}'s tensor was changed in place before step(); "
                                  "that step is not recorded for it, later ones are")
                if s.acc is None:
                    continue
            if s.index < 0:
                s.index = len(hist.info)
                hist.info[s.name] = {"type": type(s.module).__name__, "where": s.where,
                                     "channel_dim": s.cd if isinstance(s.cd, int) and self.per_channel else None,
                                     "units": list(s.units)}
            if x is not None:
                sig.append((s, x.shape, x.dtype, x.device, s.quant is not None))
            else:
                sig.append((s, s.acc.channels, s.quant is not None))
        sig = tuple(sig)
        plan = self._descs.get(sig)
        if plan is None:
            plan = self._descs[sig] = self._plan(sig)
        return plan

    def _drain(self) -> None:
        """Reduce the batch of steps waiting to be reduced, if any: on the recorder's thread when it has a core
        of its own (one batch at a time: the one before must be done), else now."""
        if self._batch:
            plan, jobs = self._batch_plan, self._batch
            self._batch, self._batch_plan = [], None
            if self._async:
                self._wait()
                self._submit(self._finish_batch, plan, jobs, "async")
            else:
                self._finish_batch(plan, jobs, "")

    def _finish_batch(self, plan: _Plan, jobs: list, buffers: str) -> None:
        try:
            self._reduce_batch(plan, jobs, buffers)
        except BaseException:
            # Their held layers were not reduced: read back as "not called" (NaN), never as stale memory.
            at = [plan.order.index(s) for g in plan.groups for s in g.slots]
            for job in jobs:
                job[2][at, 0] = 0
            raise

    def _submit(self, fn, *args) -> None:
        if self._worker is None:
            self._worker = _Worker()
        self._worker.submit(fn, *args)

    def _finish(self, plan: _Plan, job: tuple, buffers: str) -> None:
        """Reduce the held groups of one step and write its history row (on the recorder's thread, with its own
        scratch buffers, or inline)."""
        held, values, ints, _ = job
        r = plan.r
        for g, xs in zip(plan.groups, held):
            self._reduce_held(g, [x for x, _ in xs], buffers)
        if r is not None:
            if plan.host is not None:
                plan.host.copy_(plan.raw)  # the one device -> host transfer
                values[plan.row_tail:] = r[plan.raw_tail:]
            for span in plan.spans:
                _write_span(values, span, r[span[1]: span[1] + 5 * span[2]])
        self._check_versions(plan, [job])
        if not np.isfinite(values).all():
            found = {s.name: x for g, xs in zip(plan.groups, held) for s, (x, _) in zip(g.slots, xs)}
            self._count_nonfinite(plan.desc, values, found)
        if self._reduce:
            # Every rank's row merged into this one (every rank must call step() together).
            from bnaudit.distributed import reduce_row

            reduce_row(values, ints, plan.desc, group=self._reduce_group)

    def _wait(self) -> None:
        """Wait until the recorder's thread has written every step handed to it (re-raising its error)."""
        if self._worker is not None:
            self._worker.wait()

    def _settle(self) -> None:
        """Write every step taken so far: the waiting batch, and whatever the recorder's thread has."""
        if self._batch:
            _one_thread(self._drain)
        self._wait()

    def _reduce_batch(self, plan: _Plan, jobs: list, buffers: str) -> None:
        """Reduce a batch of steps of one structure: each group's tensors of every step concatenated and reduced
        at once, then every step's row written in one assignment per group. Few Python calls: on the
        recorder's thread each one contends with the training step for Python's lock."""
        n = len(jobs)
        found = False
        for i, (g, span) in enumerate(zip(plan.groups, plan.spans)):
            pos, total = span[0], span[2]
            x = self._cat([x for job in jobs for x, _ in job[0][i]], (g.shape[0], total * n, *g.shape[2:]),
                          buffers + "bcat")
            res = self._buf(buffers + "bres", x, 5 * total * n).view(5, total * n)
            group_stats(x, work=self._buf(buffers + "bwork", x), out=tuple(res))
            got = res.numpy().reshape(5, n, total)  # (statistic, step, channel)
            block = _span_rows(got, span, jobs[0][1].dtype)
            found = found or not np.isfinite(got[0]).all()  # a NaN/Inf anywhere makes its channel's mean one
            for job, row in zip(jobs, block):
                job[1][pos: pos + len(row)] = row
        self._check_versions(plan, jobs)
        if found:  # count NaN/Inf exactly in the layers that have them
            for held, values, _, _ in jobs:
                if not np.isfinite(values).all():
                    self._count_nonfinite(plan.desc, values, {s.name: x for g, xs in zip(plan.groups, held)
                                                              for s, (x, _) in zip(g.slots, xs)})

    def _check_versions(self, plan: _Plan, jobs: list) -> None:
        """Mark a held tensor changed in place after its step() (by a later step) as not recorded for that step:
        its values are gone."""
        if all(x._version == ver for job in jobs for xs in job[0] for x, ver in xs):
            return
        for held, _, ints, step in jobs:
            for g, xs in zip(plan.groups, held):
                for s, (x, ver) in zip(g.slots, xs):
                    if x._version != ver:
                        ints[plan.order.index(s), 0] = 0  # read back as "not called": NaN statistics
                        self.history.notes.append(f"step {step}: {s.name}'s tensor was changed in place before "
                                                  "it was reduced; that step is not recorded for it")

    def _reduce_held(self, g: _Group, xs: list[torch.Tensor], buffers: str = "") -> None:
        """Reduce a group's tensors at once into its slices of the raw row (``buffers`` names the scratch
        buffers: the recorder's thread has its own)."""
        x = xs[0] if len(xs) == 1 else self._cat(xs, g.shape, buffers + "cat")
        group_stats(x, work=self._buf(buffers + "work", x), out=g.views)

    def _cat(self, xs: list[torch.Tensor], shape: tuple[int, ...], buffer: str) -> torch.Tensor:
        """``xs`` concatenated along their channels, into the named scratch buffer viewed as ``shape``
        (half precision gets a fresh tensor: it is reduced in float32 anyway)."""
        if xs[0].dtype in (torch.float16, torch.bfloat16):
            return torch.cat(xs, dim=1)
        return torch.cat(xs, dim=1, out=self._buf(buffer, xs[0], math.prod(shape)).view(shape))

    def _plan(self, sig: tuple) -> _Plan:
        """Lay out one row structure and how a step fills it. Row order: per group (held tensors of one batch
        and trailing shape, any widths) ``means | m2s | mins | maxes | nonzeros``, per layer reduced in its
        hook ``mean | m2 | min | max | nonzero | nonfinite``, zeros standing for the grouped layers' NaN/Inf
        counts, quantiles, BatchNorm buffers.

        The step computes into a raw row on the tensors' device: a group's statistics arrive per channel
        (``means | m2s | channel mins | channel maxes | channel nonzeros``, 5 x its total width, reduced to one
        min/max/count per layer on the host), everything after the groups is laid out as in the row."""
        groups: dict[tuple, list[_Slot]] = {}
        accs: list[_Slot] = []
        quant: list[_Slot] = []
        device = None
        for entry in sig:
            s = entry[0]
            x = s.stash
            if x is not None:
                groups.setdefault((*_ab(x), x.dim(), x.dtype, x.device), []).append(s)
                device = device or x.device
            else:
                accs.append(s)
                device = device or s.acc.mean.device
            if s.quant is not None:
                quant.append(s)
        cols: dict[int, tuple[str, _Cols]] = {}
        pos = spos = 0
        grouped = []
        spans = []
        members_of = []
        # Runs of _RUN_MAX values: few calls (on the recorder's thread each contends with the training step
        # for Python's lock), yet each run stays in one core's cache.
        held = sum(m.stash.numel() for members in groups.values() for m in members)
        threaded = self._async and held >= _ASYNC_MIN and (device is None or device.type == "cpu")
        for members in _split(groups.values(), _RUN_MAX):
            widths = [m.stash.shape[1] for m in members]
            k, total = len(members), sum(widths)
            # the row's channels per member: all of them, or one (whole-tensor: collapsed on the host, which
            # needs the values per channel, A x B)
            row_widths = [1] * k if self._whole else widths
            rt = sum(row_widths)
            per = members[0].stash.numel() // widths[0] if self._whole else 0
            off = 0
            for j, m in enumerate(members):
                c = row_widths[j]
                cols[m.index] = (m.name, _Cols(c, pos + off, pos + rt + off, pos + 2 * rt + j, pos + 2 * rt + k + j,
                                               pos + 2 * rt + 2 * k + j, -1))
                grouped.append(m.index)
                off += c
            spans.append((pos, spos, total, np.cumsum([0, *widths[:-1]]), k, per))
            members_of.append((members, spos, total))
            pos += 2 * rt + 3 * k
            spos += 5 * total
        row_tail, raw_tail = pos, spos
        for s in accs:
            c = s.acc.channels
            cols[s.index] = (s.name, _Cols(c, pos, pos + c, pos + 2 * c, pos + 2 * c + 1, pos + 2 * c + 2, pos + 2 * c + 3))
            pos += 2 * c + 4
        for i in grouped:
            name, c = cols[i]
            cols[i] = (name, replace(c, nonfinite=pos))
            pos += 1
        nf_zero = len(grouped)
        for s in quant:
            name, c = cols[s.index]
            qu = int(s.quant.numel())
            cols[s.index] = (name, replace(c, q=pos, qu=qu))
            pos += qu
        bns, bn_mods = [], []
        for name, m in self._bns:
            ch = self.history.bn_info[name]["channels"]
            if ch and self.per_channel:
                bns.append((name, ch, pos, pos + ch, pos + 2 * ch))
                pos += 2 * ch + 1
            elif ch:  # whole-tensor summaries only: keep the counter, not the per-channel buffers
                bns.append((name, 0, -1, -1, pos))
                pos += 1
            else:
                bns.append((name, 0, -1, -1, -1))
                continue
            bn_mods.append((name, m))
            device = device or m.running_mean.device
        ordered = sorted(cols)
        by_index = {s.index: s for s in self._slots}
        desc = _Desc(pos, tuple(cols[i] for i in ordered), tuple(bns))
        plan = _Plan(desc, [by_index[i] for i in ordered], accs, quant, bn_mods, nf_zero, device)
        plan.held, plan.threaded = held, threaded
        # steps of this structure per batch: the first count that reaches either bound
        plan.batch = max(1, min(_BATCH_STEPS, -(-_BATCH_VALUES // max(held, 1))))
        if plan.order and not accs:
            plan.ints = np.array([(1, s.n) for s in plan.order], dtype=np.int64)
        size = raw_tail + pos - row_tail
        if size:
            plan.raw = torch.zeros(size, dtype=torch.float32, device=device)
            plan.host = None if device.type == "cpu" else torch.zeros(size, dtype=torch.float32)
            plan.r = (plan.raw if plan.host is None else plan.host).numpy()
            plan.spans, plan.row_tail, plan.raw_tail = tuple(spans), row_tail, raw_tail
            for members, at, total in members_of:
                x = members[0].stash
                views = tuple(plan.raw[at + j * total: at + (j + 1) * total] for j in range(5))
                plan.groups.append(_Group(members, (x.shape[0], total, *x.shape[2:]), views))
            if accs or quant or bn_mods:
                plan.tail = plan.raw[raw_tail:]
            # else the tail is the grouped layers' NaN/Inf counts alone: zeros, written once by torch.zeros
        return plan

    def _buf(self, which: str, like: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """A reusable flat scratch buffer of at least ``n`` (default ``like.numel()``) values of ``like``'s
        dtype (float32 for half precision, which is reduced in float32) and device. It grows to the largest
        tensor reduced and is kept until the recorder exits: a fresh large temporary per reduction costs page
        faults that outweigh the arithmetic."""
        dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        shaped = n is None
        n = like.numel() if n is None else n
        if shaped:  # the buffer already viewed in like's shape, cached: one lookup instead of two views a call
            got = self._cache.get((which, dtype, like.device, like.shape))
            if got is not None and got._base is self._cache.get((which, dtype, like.device)):
                return got
        key = (which, dtype, like.device)
        t = self._cache.get(key)
        if t is None or t.numel() < n:
            t = self._cache[key] = torch.empty(n, dtype=dtype, device=like.device)
        if shaped:
            view = self._cache[(which, dtype, like.device, like.shape)] = t[:n].view(like.shape)
            return view
        return t[:n]

    def _zeros(self, n: int, device: torch.device | None) -> torch.Tensor:
        key = (n, device)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = torch.zeros(n, device=device)
        return t

    def _count_nonfinite(self, desc: _Desc, values: np.ndarray, held: dict[str, torch.Tensor]) -> None:
        # A NaN/Inf shows in its channel's mean: count them exactly, now, for the layers that were held.
        for name, c in desc.slots:
            if np.isfinite(values[c.mean: c.mean + c.channels]).all():
                continue
            x = held.get(name)
            if x is not None:
                values[c.nonfinite] = float(count_nonfinite(x))


def record(
    model: nn.Module,
    *,
    layers: Iterable[str] | Mapping[str, str] | None = None,
    per_channel: bool = True,
    every: int = 1,
    units: Mapping[str, int | Sequence[int]] | None = None,
    quantiles: Sequence[float] = (0.15, 0.5, 0.85),
    chunk: int = 256,
    reduce: bool = False,
    group: Any = None,
) -> Recorder:
    """Record per-layer (and per-channel) activation statistics while your own training loop runs.

    Use as ``with bnaudit.record(model) as rec: ... rec.step()``; the module docstring says what is recorded,
    what it costs and how torch.compile is handled.

    Args:
        model: the module to watch (a ``torch.compile`` wrapper is unwrapped). It is only read.
        layers: module names or glob patterns (``"features.*"``), or a mapping name -> ``"input"`` /
            ``"output"``. Default: normalization layers (input), Linear/Conv layers and activations (output).
        per_channel: keep per-channel mean/variance (``channel_mean``, ``channel_var``); False keeps
            whole-tensor summaries only (fewer bytes per step).
        every: record one step in ``every`` (the other steps cost one Python check per hook).
        units: layer -> channel index or indices whose value quantiles to keep per step (e.g. the
            15/50/85th percentiles of a sigmoid's input, Ioffe & Szegedy 2015 Fig. 1).
        quantiles: the quantile levels for ``units``.
        chunk: the most history rows preallocated at a time.
        reduce: inside a torch.distributed process group, merge every rank's statistics once per recorded
            step (means/variances by Chan's update, extremes and counts over all ranks), so each rank's history
            describes the global batch; every rank must call ``step()`` together. Ignored outside one.
        group: the process group for ``reduce`` (default: the world).

    Returns:
        A Recorder (a context manager); its ``history`` is a History.

    Raises:
        RecordingError: ``layers`` or ``units`` name no module; hooks that never fire (torch.compile).
        UsageError: invalid ``every``, ``chunk`` or ``quantiles``.
    """
    return Recorder(model, layers=layers, per_channel=per_channel, every=every, units=units, quantiles=quantiles,
                    chunk=chunk, reduce=reduce, group=group)


def iter_bn(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """BatchNorm layers of a model by qualified name (shared with the probes)."""
    for name, m in model.named_modules():
        if name and is_batchnorm(m):
            yield name, m
