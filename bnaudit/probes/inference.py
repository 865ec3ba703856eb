"""The experiments on the inference path (BN301, BN306, BN308): does a sample's output depend on its batch,
does ``predict`` change the buffers, which BatchNorm layers does ``predict`` leave in train mode.

- ``cobatch_invariance``: one sample's output through the inference path alone and inside different
  co-batches, with the model's own numerical noise measured where a change needs explaining (BN301); a
  correct inference path gives the same answer whatever else is in the batch.
- ``predict_train_mode_layers``: the BatchNorm layers a ``predict`` leaves in train mode when it is handed a
  model straight out of its training loop (BN308).
- ``predict_mutations``: every buffer hashed before and after ``predict`` (BN306).

The inference path is the user's ``predict`` called on the model in the modes it was given in (a model left
in train mode after its training loop, or one evaluated once at load: each is judged as it will be used), or,
without a predict, an eval-mode forward. Each probe runs on the model itself and puts it back afterwards
(``probes.state.ModelState``), restores the global RNG it seeds, and returns a small frozen record."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnaudit.layers import is_batchnorm, is_dropout
from bnaudit.probes.common import (
    Predict,
    batch_size,
    buffer_hashes,
    concat,
    forward,
    sample_output,
    seeded,
    short_error,
    take,
    tracks_running_stats,
)
from bnaudit.probes.state import ModelState, state_for


@dataclass(frozen=True)
class CobatchResult:
    """One sample's output through the inference path in several co-batches.

    Attributes:
        max_abs_delta: the largest |output difference| of the probed sample between any co-batch and the
            reference co-batch.
        scale: max |output| of the sample in the reference co-batch (what ``relative`` divides by).
        relative: ``max_abs_delta / scale``.
        compared: the co-batch sizes compared (the reference first; 1 means the sample alone).
        batch_stat_layers: BatchNorm layers that normalized with batch statistics during inference (in
            train mode, or built with ``track_running_stats=False``).
        train_mode_layers: those of them that were in train mode.
        untracked_layers: those of them without running statistics (``track_running_stats=False``).
        active_dropout: dropout layers that were in train mode during inference.
        single_sample_error: the error inference raised on a batch of one sample, if it did.
        used_predict: whether the user's predict() was the inference path.
        noise: the model's own numerical noise on this path, relative to ``scale``, where it was measured
            (only when a change exceeded the tolerance asked for): the largest change of the sample between
            co-batches that no batch dependence can tell apart (see ``cobatch_invariance``); else None.
        changed: with a tolerance asked for, whether some change exceeded both the tolerance and
            ``noise_margin`` times the noise measured for that comparison; else None.
        note: why the experiment could not run, when it could not (then the numbers are 0).
    """

    max_abs_delta: float = 0.0
    scale: float = 0.0
    relative: float = 0.0
    compared: tuple[int, ...] = ()
    batch_stat_layers: tuple[str, ...] = ()
    train_mode_layers: tuple[str, ...] = ()
    untracked_layers: tuple[str, ...] = ()
    active_dropout: tuple[str, ...] = ()
    single_sample_error: str | None = None
    used_predict: bool = False
    noise: float | None = None
    changed: bool | None = None
    note: str = ""


# A change counts as batch dependence only when it is this many times the noise measured for its comparison:
# on a batch-independent model the noise pair and the compared pair differ by rounding alone, of one size.
NOISE_MARGIN = 4.0


def _inference(model: nn.Module, inputs: Any, predict: Predict | None) -> Any:
    with torch.no_grad():
        if predict is None:
            model.eval()
            return forward(model, inputs)
        return predict(model, inputs)


def _pool(batches: Iterable[Any], want: int) -> Any | None:
    """Concatenate the inputs of the first batches until ``want`` samples are gathered."""
    parts, total = [], 0
    for batch in batches:
        inputs = getattr(batch, "inputs", batch)
        n = batch_size(inputs)
        if not n:
            continue
        parts.append(inputs)
        total += n
        if total >= want:
            break
    if not parts:
        return None
    try:
        return concat(parts) if len(parts) > 1 else parts[0]
    except (ValueError, RuntimeError):
        return parts[0]


def _delta(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


def _relative(d: float, scale: float) -> float:
    return d / scale if scale > 0 else (0.0 if d == 0 else math.inf)


class _CobatchRun:
    """One call of the inference path on some of the pooled samples: from the model as given (put back after
    each call), with the same RNG seed every time, noting in ``seen`` the BatchNorm layers that use batch
    statistics or sit in train mode and the dropout layers that are active."""

    def __init__(self, model: nn.Module, state: ModelState, pool: Any, predict: Predict | None, seed: int,
                 device: torch.device | str | None) -> None:
        self.model, self.state, self.pool = model, state, pool
        self.predict, self.seed, self.device = predict, seed, device
        self.seen: dict[str, set[str]] = {"batch": set(), "train": set(), "untracked": set(), "dropout": set()}

    def __call__(self, index: list[int], position: int = 0) -> torch.Tensor:
        """The output for the sample at ``position`` of the co-batch made of the pooled samples ``index``."""
        handles = []
        with self.state.restoring():
            for name, m in self.model.named_modules():
                if is_batchnorm(m):
                    handles.append(m.register_forward_pre_hook(_bn_spy(name, self.seen)))
                elif is_dropout(m):
                    handles.append(m.register_forward_pre_hook(_dropout_spy(name, self.seen)))
            try:
                with seeded(self.seed, self.device):
                    out = _inference(self.model, take(self.pool, index), self.predict)
            finally:
                for h in handles:
                    h.remove()
        return sample_output(out, len(index), position)


def cobatch_invariance(
    model: nn.Module,
    batches: Iterable[Any],
    predict: Predict | None = None,
    *,
    cobatch_size: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    tolerance: float | None = None,
    noise_margin: float = NOISE_MARGIN,
    state: ModelState | None = None,
) -> CobatchResult:
    """Run one sample through the inference path alone and inside two disjoint co-batches of real samples.

    Every call starts from the model exactly as given (its modes included: a model evaluated once at load
    is judged in eval mode, a model left in train mode after its training loop in train mode) with the same
    RNG seed, so the only thing that differs between calls is what else is in the batch.

    A change can also be rounding: kernels pick their blocking, and on GPUs even their precision, by batch
    size. When ``tolerance`` is given and a change exceeds it, the model's own noise is measured on the same
    path with co-batches that no batch dependence through batch statistics can tell apart from the compared
    ones: for the two co-batches of one size, the reference co-batch with the sample moved to its end; for
    the sample alone, the sample repeated to the co-batch's size (its batch mean and variance are its own).
    A comparison then counts only when its change also exceeds ``noise_margin`` times its noise.

    Args:
        model: the model to probe; put back as it was afterwards.
        batches: batches (``Batch`` objects or raw inputs); the first ones are pooled for samples.
        predict: the user's ``predict(model, inputs)``; None means an eval-mode forward.
        cobatch_size: samples per co-batch, the probed sample included.
        seed: RNG seed set before every call.
        device: the device the batches live on (for seeding its RNG).
        tolerance: the relative change tolerated; None: measure no noise and leave ``changed`` None.
        noise_margin: how many times the measured noise a change must exceed.
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.

    Returns:
        A CobatchResult; ``note`` is set when there were fewer than two samples to compare.
    """
    state = state_for(model, state)
    size = max(2, int(cobatch_size))
    pool = _pool(batches, 2 * size - 1)
    used_predict = predict is not None
    if pool is None or (batch_size(pool) or 0) < 2:
        return CobatchResult(used_predict=used_predict, note="needs at least two samples")
    n = batch_size(pool) or 0
    partners = list(range(1, n))
    half = min(size - 1, max(1, len(partners) // 2))
    reference = [0, *partners[:half]]
    others = [[0, *partners[half : 2 * half]]] if len(partners) >= 2 * half else []

    run = _CobatchRun(model, state, pool, predict, seed, device)
    seen = run.seen
    ref = run(reference)
    same = [run(index) for index in others]
    single, single_error = None, None
    try:
        single = run([0])
    except Exception as exc:  # noqa: BLE001 - a failure on one sample is itself the evidence
        single_error = short_error(exc)
    scale = float(ref.abs().max()) if ref.numel() else 0.0

    def rel(d: float) -> float:
        return _relative(d, scale)

    same_delta = max((_delta(out, ref) for out in same), default=0.0)
    single_delta = _delta(single, ref) if single is not None else 0.0
    delta = max(same_delta, single_delta)
    noise, changed = None, None
    if tolerance is not None:
        changed = False
        noises = []
        if same and rel(same_delta) > tolerance:
            moved = [*reference[1:], 0]  # the same co-batch, the sample last
            floor = rel(_delta(run(moved, len(moved) - 1), ref))
            noises.append(floor)
            changed = rel(same_delta) > max(tolerance, noise_margin * floor)
        if single is not None and rel(single_delta) > tolerance:
            floor = rel(_delta(run([0] * len(reference)), single))
            noises.append(floor)
            changed = changed or rel(single_delta) > max(tolerance, noise_margin * floor)
        noise = max(noises) if noises else None
    return CobatchResult(
        max_abs_delta=delta,
        scale=scale,
        relative=rel(delta),
        compared=(len(reference), *(len(i) for i in others), *((1,) if single is not None else ())),
        batch_stat_layers=tuple(sorted(seen["batch"])),
        train_mode_layers=tuple(sorted(seen["train"])),
        untracked_layers=tuple(sorted(seen["untracked"])),
        active_dropout=tuple(sorted(seen["dropout"])),
        single_sample_error=single_error,
        used_predict=used_predict,
        noise=noise,
        changed=changed,
    )


def _bn_spy(name: str, seen: dict[str, set[str]]):
    def hook(m: nn.Module, args: Any) -> None:
        # torch normalizes with batch statistics when training, or when it has no running buffers.
        untracked = getattr(m, "running_mean", None) is None
        if m.training or untracked:
            seen["batch"].add(name)
        if m.training:
            seen["train"].add(name)
        if untracked:
            seen["untracked"].add(name)

    return hook


def _dropout_spy(name: str, seen: dict[str, set[str]]):
    def hook(m: nn.Module, args: Any) -> None:
        if m.training and float(getattr(m, "p", 0.0)) > 0:
            seen["dropout"].add(name)

    return hook


def predict_train_mode_layers(
    model: nn.Module, batch: Any, predict: Predict, *, seed: int = 0, device: torch.device | str | None = None,
    state: ModelState | None = None,
) -> tuple[str, ...]:
    """The BatchNorm layers that normalize with batch statistics when ``predict`` is called on the model
    right after ``model.train()`` (as at the end of a training loop): empty when predict() puts the model in
    eval mode itself. One call, on the first two samples of ``batch``; the model is put back afterwards.

    Raises:
        Exception: whatever predict() raises; callers turn it into DataError.
    """
    state = state_for(model, state)
    inputs = getattr(batch, "inputs", batch)
    n = batch_size(inputs) or 0
    if n < 2:
        return ()
    seen: dict[str, set[str]] = {"batch": set(), "train": set(), "untracked": set(), "dropout": set()}
    handles = []
    with state.restoring():
        model.train()
        for name, m in model.named_modules():
            if is_batchnorm(m) and tracks_running_stats(m):
                handles.append(m.register_forward_pre_hook(_bn_spy(name, seen)))
        try:
            with seeded(seed, device), torch.no_grad():
                predict(model, take(inputs, [0, 1]))
        finally:
            for h in handles:
                h.remove()
    return tuple(sorted(seen["train"]))


@dataclass(frozen=True)
class BufferChange:
    """One module whose buffers changed across predict().

    Attributes:
        layer: the module's qualified name.
        buffers: the names of its buffers that changed.
        max_abs_delta: the largest |change| over its floating-point buffers.
        num_batches_tracked: (before, after) for a BatchNorm layer, else None.
    """

    layer: str
    buffers: tuple[str, ...]
    max_abs_delta: float
    num_batches_tracked: tuple[int, int] | None = None


@dataclass(frozen=True)
class MutationResult:
    """Buffers hashed before and after the inference path.

    Attributes:
        changes: modules whose buffers changed, by name.
        calls: how many inference calls ran (one per batch).
        samples: how many samples went through.
        used_predict: whether the user's predict() was the inference path.
        note: why the experiment could not run, when it could not.
    """

    changes: tuple[BufferChange, ...] = ()
    calls: int = 0
    samples: int = 0
    used_predict: bool = False
    note: str = ""


def predict_mutations(
    model: nn.Module,
    batches: Iterable[Any],
    predict: Predict | None = None,
    *,
    max_calls: int = 2,
    seed: int = 0,
    device: torch.device | str | None = None,
    state: ModelState | None = None,
) -> MutationResult:
    """Hash every buffer of the model, run the inference path on a few batches, hash again.

    The model is used as given (a model left in train mode after its training loop leaks its inputs into
    the running statistics through a predict() that does not call ``model.eval()``; a model evaluated once
    at load does not), and put back afterwards.

    Args:
        model: the model to probe; put back as it was afterwards.
        batches: batches (``Batch`` objects or raw inputs).
        predict: the user's ``predict(model, inputs)``; None means an eval-mode forward.
        max_calls: how many batches to run through it.
        seed: RNG seed for the calls.
        device: the device the batches live on (for seeding its RNG).
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.

    Returns:
        A MutationResult listing every module whose buffers changed.
    """
    state = state_for(model, state)
    with state.restoring():
        before_hash = buffer_hashes(model)
        before = {name: b.detach().clone() for name, b in model.named_buffers() if b is not None}
        calls = samples = 0
        with seeded(seed, device):
            for batch in batches:
                inputs = getattr(batch, "inputs", batch)
                _inference(model, inputs, predict)
                calls += 1
                samples += batch_size(inputs) or 0
                if calls >= max_calls:
                    break
        if calls == 0:
            return MutationResult(used_predict=predict is not None, note="no batches")
        after_hash = buffer_hashes(model)
        after = {name: b.detach().clone() for name, b in model.named_buffers() if b is not None}
        modules = dict(model.named_modules())
    changed = sorted(
        name for name in set(before_hash) | set(after_hash) if before_hash.get(name) != after_hash.get(name)
    )
    by_module: dict[str, list[str]] = {}
    for name in changed:
        owner, _, _ = name.rpartition(".")
        by_module.setdefault(owner, []).append(name.rpartition(".")[2])
    changes = []
    for owner, names in sorted(by_module.items()):
        delta = 0.0
        for short in names:
            full = f"{owner}.{short}" if owner else short
            old, new = before.get(full), after.get(full)
            if old is None or new is None or old.shape != new.shape:
                delta = math.inf
            elif old.is_floating_point():
                delta = max(delta, float((new.double() - old.double()).abs().max())) if old.numel() else delta
        nbt = None
        m = modules.get(owner)
        if m is not None and is_batchnorm(m) and "num_batches_tracked" in names:
            key = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
            nbt = (int(before[key]), int(after[key]))
        changes.append(BufferChange(owner, tuple(names), delta, nbt))
    return MutationResult(tuple(changes), calls, samples, predict is not None)


__all__ = [
    "NOISE_MARGIN",
    "BufferChange",
    "CobatchResult",
    "MutationResult",
    "cobatch_invariance",
    "predict_mutations",
    "predict_train_mode_layers",
]
