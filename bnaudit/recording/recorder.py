"""Recording activation statistics across a user's own training steps: ``bnaudit.record``.

Public API (stable; other modules build on these exact names)::

    with bnaudit.record(model, *, layers=None, per_channel=True, every=1, units=None,
                        quantiles=(0.15, 0.5, 0.85), chunk=256, reduce=False, group=None) as rec:
        for x, y in loader:              # the user's loop, unchanged
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            rec.step()                   # marks the end of one training step
    h = rec.history                      # History (bnaudit.recording.history)

What is recorded, per selected module and recorded step: ``mean``, ``var`` (population), ``std``, ``min``,
``max``, ``zero_frac`` (exact zeros), ``nonfinite_frac`` (NaN/Inf), ``count`` (values per channel in the
step) and ``calls``; with ``per_channel=True`` also ``channel_mean`` / ``channel_var`` / ``channel_std``
(``(steps, C)``); for watched ``units`` the ``quantiles`` of each unit's values within the step's first call
(``(steps, Q, U)``). Normalization layers are measured on their *input* (a train-mode BatchNorm's input
statistics are its batch statistics); Linear/Conv layers and activations on their *output*. For every
BatchNorm layer of the model, every recorded step: ``running_mean``, ``running_var``,
``num_batches_tracked`` (as they are at the end of the step), its ``training`` flag and whether its affine
parameters ``requires_grad`` (``History.bn_modes``).

How. One path: every hook reduces its tensor at once, on the tensor's device, under no autograd, to that
call's per-channel mean and population variance (torch's per-channel moments kernel, the one BatchNorm's
own statistics use: two passes, exact to float32 rounding far from zero), whole-tensor min and max, and a
nonzero count; half precision is reduced in float32. NaN/Inf are counted exactly when present: on CPU the
hook reads the range it just computed (a memory read) and counts only if it is not finite; on an
accelerator it always counts (one more pass, no host sync). Nothing is held past the hook except the one
tensor last reduced, by reference, so that the next hook given the very same unchanged tensor (a Conv
output that its BatchNorm reads next) reuses its statistics: identity and version counter are compared,
never a storage address. ``step()`` concatenates the step's results with the BatchNorm buffers into one
device vector and copies it to the host in one transfer: on CPU it is the row at once; on an accelerator the
copy is non-blocking into pinned memory and the row is written at the next ``step()``, at the first read of
``history``, or at exit (no ``.item()``, ``.cpu()`` or sync per module or per step). A layer called several
times in a step is merged on the host by Chan's update (calls at different widths: as whole tensors, with a
note); ``per_channel=False`` collapses each layer's channels the same way. No thread, no change of torch's
settings. Memory beyond the history: the tiny per-call results of the current step (2C + 4 values a call),
one host row, and the reference to the last reduced tensor, released at the next hook or ``step()``.
``benchmarks/record_overhead.py`` measures the cost against an unhooked step.

Steps. ``rec.step()`` ends a step. If it is never called, every forward pass inside the ``with`` block is
merged into one row, written when the block exits. ``every=k`` records steps 0, k, 2k, ...; on the others
each hook returns at once.

torch.compile. Hooks added after a compiled model's first call never fire (dynamo skips module-hook guards by
default). When a step ends in which parameters changed (an optimizer step ran) or a BatchNorm's
``num_batches_tracked`` moved, yet not one hook has fired since recording began, ``step()`` raises
``RecordingError`` naming the fix. A ``torch.compile(model)`` wrapper is unwrapped (``_orig_mod``), so layer
names are the uncompiled model's.

Distributed. Inside a torch.distributed process group, ``reduce=True`` merges every rank's row once per
recorded step (``bnaudit.recording.reduce``), so every rank keeps the statistics of the global batch; every
rank must call ``step()`` together. Outside a process group it does nothing.

On exit, normal or by exception, every hook handle is removed and every reference released; the model's
parameters, buffers, flags and hook dictionaries are as they were (the recorder only reads)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit.distributed import is_active
from bnaudit.errors import BnauditError, UsageError
from bnaudit.layers import batchnorm_layers, is_activation, is_batchnorm, is_conv, is_norm, is_weight_layer
from bnaudit.recording.history import History
from bnaudit.recording.layout import EXTRA, Layout, collapse, merge_blocks
from bnaudit.recording.reduce import reduce_row
from bnaudit.stats import as_3d, channel_moments, count_nonfinite

__all__ = ["Recorder", "RecordingError", "default_layers", "record"]

# Channels live last for these (token layouts (N, L, F)); first after the batch for conv-style layers.
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.Bilinear)
_HALF = (torch.float16, torch.bfloat16)


class RecordingError(BnauditError):
    """Recording cannot measure what it was asked to: hooks that never fire on a compiled model, or
    ``layers``/``units`` that name no module."""


def default_layers(model: nn.Module) -> dict[str, str]:
    """The modules ``record`` hooks by default and what it measures on each: ``input`` for normalization
    layers, ``output`` for Linear/Conv layers and activations (a normalization layer's own submodules are
    left out)."""
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


def reduce_call(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One call's statistics of an ``(A, C, B)`` or ``(A, C)`` view: per-channel mean and population variance
    (``channel_moments``, device tensors), then ``min, max, nonzero count, NaN/Inf count``: on CPU as host
    floats (reading a CPU value is a memory read), elsewhere as one 4-element device tensor (never read here:
    no host sync)."""
    mean, var = channel_moments(x3)
    mn, mx = torch.aminmax(x3)
    nonzero = torch.count_nonzero(x3)
    if x3.device.type == "cpu":
        lo, hi = mn.item(), mx.item()
        # The range is finite exactly when no value is NaN/Inf: count them only then.
        nonfinite = 0 if math.isfinite(hi - lo) else int(count_nonfinite(x3))
        return mean, var, (lo, hi, float(nonzero), float(nonfinite))
    nonfinite = count_nonfinite(x3)
    return mean, var, torch.stack((mn, mx, nonzero.to(mean.dtype), nonfinite.to(mean.dtype)))


class _Slot:
    """One recorded module: what it measures and what the current step has collected."""

    __slots__ = ("calls", "cd", "index", "module", "name", "note", "quant", "units", "where")

    def __init__(self, name: str, module: nn.Module, where: str, units: tuple[int, ...]):
        self.name, self.module, self.where, self.units = name, module, where, units
        self.cd: Any = "auto"  # channel dim: "auto" until the first call, then an int or None (whole tensor)
        self.calls: list[tuple[int, int, tuple]] = []  # this step's (values per channel, channels, results)
        self.quant: torch.Tensor | None = None
        self.index = -1  # order of first call, -1 until then
        self.note = ""


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
        orig = getattr(model, "_orig_mod", None)
        self.compiled = isinstance(orig, nn.Module) or getattr(model, "_compiled_call_impl", None) is not None
        self.model = orig if isinstance(orig, nn.Module) else model
        self.per_channel, self.every = per_channel, every
        self.history = History(chunk=chunk)
        self._q = qs
        self._select = self._resolve_layers(layers)
        self._units = self._resolve_units(units or {})
        self.history.quantile_levels = qs if self._units else ()
        self._slots: list[_Slot] = []
        self._order: list[_Slot] = []  # slots in the order of their first call
        self._handles: list[Any] = []
        self._bns = [(n, m) for n, m in batchnorm_layers(self.model).items() if n]
        self._params = list(self.model.parameters())
        self._step = 0
        self._active = True
        self._fired_total = self._fired_step = 0
        self._last_cd: int | None = 1
        self._last: tuple | None = None  # (tensor, version, view shape, results) of the last reduction
        self._pending: tuple | None = None  # (event, host copy, finish) of a row still in flight
        self._layouts: dict[tuple, Layout] = {}
        self._versions = self._nbt = 0
        self._open = False
        self._group = group
        self._reduce = False
        if reduce:
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
        self._versions, self._nbt = self._param_versions(), self._bn_counter()
        self.history.settle = self._settle
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._active:
                    self._check_fired()
                if any(s.calls for s in self._slots):
                    self._write_row()
                self._settle()
            else:  # keep what was measured, but never mask the user's exception
                try:
                    if any(s.calls for s in self._slots):
                        self._write_row()
                    self._settle()
                except Exception:  # noqa: BLE001, S110 - the user's exception is the one to see
                    pass
        finally:
            self.history.settle = None
            self._pending = self._last = None
            self._remove()
            for s in self._slots:
                s.calls, s.quant = [], None
            self._open = False

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    # -- hooks --
    def _pre_hook(self, slot: _Slot):
        def hook(module: nn.Module, args: Any) -> None:
            if self._active and args:
                self._observe(slot, args[0])
        return hook

    def _post_hook(self, slot: _Slot):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active:
                self._observe(slot, output[0] if isinstance(output, (tuple, list)) and output else output)
        return hook

    def _channel_dim(self, slot: _Slot, x: torch.Tensor) -> int | None:
        m = slot.module
        if isinstance(m, _CHANNEL_LAST):
            return -1
        if x.dim() > 2 and is_norm(m) and not is_batchnorm(m):
            # A norm class torch does not define: its per-channel weight says where the channels are (an
            # RMSNorm over the features of (N, L, F) tokens has F weights).
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == x.shape[-1] != x.shape[1]:
                return -1
        if is_conv(m) or is_norm(m) or x.dim() <= 2:
            return 1
        # Activations and other shape-preserving modules take the layout of whatever ran before.
        return self._last_cd

    def _observe(self, slot: _Slot, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        self._fired_step += 1
        if slot.cd == "auto":
            slot.cd = self._channel_dim(slot, x)
        if slot.cd is not None:
            self._last_cd = slot.cd
        if slot.index < 0:
            slot.index = len(self._order)
            self._order.append(slot)
            self.history.info[slot.name] = {"type": type(slot.module).__name__, "where": slot.where,
                                            "channel_dim": slot.cd if self.per_channel else None,
                                            "units": list(slot.units)}
        x3 = as_3d(x.detach(), slot.cd)  # detached: no reduction here enters autograd
        last = self._last
        version = None if x.is_inference() else x._version  # inference tensors have no version counter
        if last is not None and version is not None and last[0] is x and last[1] == version \
                and last[2] == x3.shape:
            got = last[3]  # the very same unchanged tensor as the last hook's: its statistics are these
        else:
            got = reduce_call(x3)
            self._last = (x, version, x3.shape, got)
        if slot.units and not slot.calls:
            slot.quant = self._quantiles(slot, x3)
        slot.calls.append((x3.numel() // x3.shape[1], x3.shape[1], got))

    def _quantiles(self, slot: _Slot, x3: torch.Tensor) -> torch.Tensor:
        """The watched units' quantiles (``(Q * U,)``, level-major) by torch.quantile's linear interpolation:
        one sort, then one interpolation per level at positions known on the host (no host sync); a unit
        holding a NaN gets NaN, as torch.quantile gives, and a unit beyond the channels NaN with a note."""
        if x3.dim() == 2:
            x3 = x3.unsqueeze(2)
        c = x3.shape[1]
        idx = [u for u in slot.units if u < c]
        if len(idx) < len(slot.units) and not slot.note:
            slot.note = f"units {[u for u in slot.units if u >= c]} beyond its {c} channels"
            self.history.notes.append(f"{slot.name}: {slot.note}")
        if not idx:
            return torch.full((len(self._q) * len(slot.units),), float("nan"), device=x3.device)
        vals = x3[:, idx, :].transpose(1, 2).reshape(-1, len(idx)).float()
        srt = vals.sort(dim=0).values
        last = vals.shape[0] - 1
        rows = []
        for q in self._q:
            lo = math.floor(q * last)
            rows.append(torch.lerp(srt[lo], srt[min(lo + 1, last)], q * last - lo))
        got = torch.where(vals.isnan().any(0), float("nan"), torch.stack(rows))  # (Q, U')
        if len(idx) < len(slot.units):
            full = torch.full((len(self._q), len(slot.units)), float("nan"), device=vals.device)
            full[:, [slot.units.index(u) for u in idx]] = got
            got = full
        return got.reshape(-1)

    # -- steps --
    def _param_versions(self) -> int:
        return sum(p._version for p in self._params)

    def _bn_counter(self) -> int:
        return sum(m.num_batches_tracked._version for _, m in self._bns
                   if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor))

    def step(self) -> None:
        """Mark the end of one training step: write the step's row (when this step is recorded) and arm
        the hooks for the next one.

        Raises:
            RecordingError: the step ran the model (parameters or BatchNorm counters moved) but not one
                hook has fired since recording began: the recorded layers were not called or got nothing
                they measure (integer inputs), or a torch.compile'd model skips hooks added after its first call.
            UsageError: called outside the ``with`` block.
        """
        if not self._open:
            raise UsageError("rec.step() called outside `with bnaudit.record(model) as rec:`")
        if self._active:
            self._check_fired()
            self._write_row()
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
            if self.compiled:
                raise RecordingError(
                    f"the model (it is compiled) trained during step {self._step} but no recording hook fired: hooks "
                    "added after a torch.compile'd model's first call never run. Enter bnaudit.record() before the "
                    "first call of the compiled model, or record the uncompiled module"
                )
            raise RecordingError(
                f"the model trained during step {self._step} but none of the recorded layers was measured: they were "
                "not called, or got no floating-point tensor to measure (integer inputs), or a torch.compile'd part "
                "of the model skips hooks added after its first call. Record layers that run on float tensors "
                "(layers=[...]), or enter bnaudit.record() before a compiled part's first call"
            )

    def _write_row(self) -> None:
        """Append this step's row: everything measured goes to the host in one copy, and the row is written
        now (CPU) or once that copy has landed (accelerators: see ``_settle``)."""
        self._settle()  # the row before this one, if its copy is still in flight
        versions = self._param_versions()
        updated = versions != self._versions
        self._versions, self._nbt = versions, self._bn_counter()
        parts: list = []  # device tensors, or tuples of host floats (CPU)
        entries, plan, counts = [], [], []  # layout entries; per layer (calls, collapse?, quantiles); ints
        for s in self._order:
            if not s.calls:
                continue
            widths = {c for _, c, _ in s.calls}
            mixed = len(widths) > 1
            whole = mixed or not self.per_channel
            if mixed and not s.note:
                s.note = "called at several widths in one step; recorded as whole-tensor summaries there"
                self.history.notes.append(f"{s.name}: {s.note}")
            for _, _, got in s.calls:
                parts += got
            qu = 0 if s.quant is None else s.quant.numel()
            if qu:
                parts.append(s.quant)
            entries.append((s.name, 1 if whole else s.calls[0][1], qu, mixed))
            plan.append(([(n, c) for n, c, _ in s.calls], whole, qu))
            counts.append((len(s.calls), sum(n * c if whole else n for n, c, _ in s.calls)))
            s.calls, s.quant = [], None
        self._last = None
        bns = []
        for name, m in self._bns:
            c = self.history.bn_info[name]["channels"]
            bns.append((name, -1 if not c else c if self.per_channel else 0))
            if c:
                if self.per_channel:
                    parts += [m.running_mean.reshape(-1), m.running_var.reshape(-1)]
                nbt = m.num_batches_tracked
                parts.append((float(nbt),) if nbt.device.type == "cpu" else nbt.reshape(1))
        key = (tuple(entries), tuple(bns))
        layout = self._layouts.get(key)
        if layout is None:  # keyed on the structure itself; a model has a handful of them
            layout = self._layouts[key] = Layout(*key)
        values, ints, flags = self.history.append(layout, self._step, updated, self.model.training)
        if counts:
            ints[:] = counts
        for k, (_, m) in enumerate(self._bns):
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            flags[k] = (m.training, (isinstance(w, torch.Tensor) and w.requires_grad)
                        or (isinstance(b, torch.Tensor) and b.requires_grad))

        def finish(host: np.ndarray) -> None:
            _fill_row(values, host, plan)
            if self._reduce:
                reduce_row(values, ints, layout, group=self._group)

        device = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
        if device.type == "cpu":  # a CPU step's values are in host memory already: gathered by numpy
            finish(np.concatenate([p if isinstance(p, tuple) else _numpy(p) for p in parts]) if parts else np.zeros(0))
            return
        # (a tuple comes from a layer left on the CPU of a model spread over devices)
        raw = torch.cat([torch.tensor(p, device=device) if isinstance(p, tuple) else p.reshape(-1).to(device)
                         for p in parts])
        host = torch.empty(raw.shape, dtype=raw.dtype, pin_memory=True)
        host.copy_(raw, non_blocking=True)
        event = torch.cuda.Event() if device.type == "cuda" else None
        if event is not None:
            event.record()
        self._pending = (event, host, finish)
        if self._reduce:  # every rank merges this row now, together
            self._settle()

    def _settle(self) -> None:
        """Write the row whose host copy is in flight, if any (waiting for that copy alone)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            event, host, finish = pending
            if event is not None:
                event.synchronize()
            finish(host.numpy())


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype in _HALF else t).numpy().reshape(-1)


def _fill_row(values: np.ndarray, raw: np.ndarray, plan: list) -> None:
    """Write a step's row from its raw host vector: per call ``mean (C) | var (C) | min | max | nonzero |
    nonfinite``, then the layer's quantiles, then the BatchNorm buffers (already laid out as the row is).
    A layer's calls are merged (and collapsed to one channel where asked) in float64 by Chan's update."""
    if all(len(calls) == 1 and not whole for calls, whole, _ in plan):
        values[:] = raw  # one call per layer, per channel: the raw vector is the row
        return
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN/Inf channel makes the merged values NaN/Inf
        values[:] = _merged_row(raw, plan)


def _merged_row(raw: np.ndarray, plan: list) -> np.ndarray:
    raw = raw.astype(np.float64, copy=False)  # merged in float64 (an accelerator's copy arrives in float32)
    out: list[np.ndarray] = []
    at = 0
    for calls, whole, qu in plan:
        merged = None
        for n, c in calls:
            block = raw[at: at + 2 * c + EXTRA]
            at += 2 * c + EXTRA
            if whole:
                n, block = collapse(n, block, c)
            merged = (n, block) if merged is None else merge_blocks(*merged, n, block)
        out += [merged[1], raw[at: at + qu]]
        at += qu
    out.append(raw[at:])
    return np.concatenate(out)


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
