"""The experiments behind the eval-mode and running-statistics rules (BN301-BN308).

Each probe takes a model, batches and (where it matters) the user's ``predict(model, inputs)``, runs on the
model itself and puts it back afterwards (``probes.state.ModelState``: modes, buffers, parameters; an audit
keeps one snapshot of its private copy for all of them), restores the global RNG it seeds, and returns a
small frozen record of numbers that a rule turns into a finding:

- ``cobatch_invariance``: one sample's output through the inference path alone and inside different
  co-batches, with the model's own numerical noise measured where a change needs explaining (BN301); a
  correct inference path gives the same answer whatever else is in the batch.
- ``predict_train_mode_layers``: the BatchNorm layers a ``predict`` leaves in train mode when it is handed a
  model straight out of its training loop (BN308).
- ``predict_mutations``: every buffer hashed before and after ``predict`` (BN306).
- ``running_stats_fit``: per BatchNorm layer, the train-mode statistics of the data against the running
  buffers, as ``z`` (mean shift in running standard deviations) and ``r`` (variance ratio) (BN302, BN303,
  and the before/after table of ``bnaudit recalibrate``).
- ``train_eval_gap``: train-mode vs eval-mode loss (or output) on the same batches (BN304); its train-mode
  half is the same ``train_mode_pass`` that ``running_stats_fit`` reads.
- ``frozen_bn_drift``: BatchNorm layers whose affine parameters are frozen but that run, or will run after
  ``model.train()``, in train mode, and how far one train-mode forward moves their buffers (BN305).
- ``eval_mode_steps``: over a recorded training history, the optimizer steps during which a trainable
  BatchNorm sat in eval mode (BN307), written over plain per-step series so any recorder can feed it.

The inference path is the user's ``predict`` called on the model in the modes it was given in (a model left
in train mode after its training loop, or one evaluated once at load: each is judged as it will be used), or,
without a predict, an eval-mode forward. Train-mode statistics are collected with BatchNorm layers in train
mode and every other module (dropout above all) in eval mode, so they describe the data rather than dropout
noise."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from bnaudit.graph import default_run as forward  # model(inputs), as the audit's graph pass calls it
from bnaudit.layers import is_batchnorm, is_dropout
from bnaudit.probes.state import ModelState, state_for

Predict = Callable[[nn.Module, Any], Any]


# --------------------------------------------------------------------------------------------- inputs


def _first_dim(leaf: Any) -> int | None:
    if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
        return int(leaf.shape[0])
    return None


def batch_size(inputs: Any) -> int | None:
    """The number of samples in ``inputs`` (a tensor or a tuple/list/dict of tensors): the leading size of
    its first tensor, or None when it holds no tensor with a batch dimension."""
    for leaf in tree_flatten(inputs)[0]:
        n = _first_dim(leaf)
        if n is not None:
            return n
    return None


def take(inputs: Any, index: Sequence[int]) -> Any:
    """The samples ``index`` of ``inputs``, in that order: every tensor whose leading size is the batch
    size is indexed, anything else (a mask shared by all samples, a flag) is passed through."""
    n = batch_size(inputs)
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return tree_map(lambda x: x[idx.to(x.device)] if _first_dim(x) == n else x, inputs)


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the batch dimension.

    Raises:
        ValueError: the batches do not share one structure.
    """
    flat = [tree_flatten(p) for p in parts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise ValueError("batches differ in structure")
    sizes = [batch_size(p) for p in parts]
    leaves = []
    for i, leaf in enumerate(flat[0][0]):
        if _first_dim(leaf) == sizes[0]:
            leaves.append(torch.cat([f[0][i] for f in flat]))
        else:
            leaves.append(leaf)
    return tree_unflatten(leaves, spec)


def sample_output(output: Any, n: int, position: int) -> torch.Tensor:
    """One sample's output as a flat float64 vector: row ``position`` of every output tensor whose leading
    size is the batch size ``n``.

    Raises:
        ValueError: the output holds no tensor with a batch dimension of size ``n``.
    """
    rows = [
        leaf[position].detach().reshape(-1).to(torch.float64).cpu()
        for leaf in tree_flatten(output)[0]
        if _first_dim(leaf) == n
    ]
    if not rows:
        raise ValueError(f"the output has no tensor with a leading batch dimension of {n}")
    return torch.cat(rows)


def first_output_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a model's output (logits for most classifiers)."""
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- state


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None):
    """Seed torch's global RNG for the block and restore the caller's RNG state afterwards, so two calls
    draw the same dropout masks and the user's random stream is left where it was."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer (``_BatchNorm`` subclass, SyncBatchNorm included) by qualified name."""
    return {name: m for name, m in model.named_modules() if is_batchnorm(m)}


def tracks_running_stats(m: nn.Module) -> bool:
    return bool(getattr(m, "track_running_stats", False)) and getattr(m, "running_mean", None) is not None


def _varies(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return flat.numel() > 1 and bool((flat != flat[0]).any())


def affine_trained(m: nn.Module) -> bool | None:
    """Whether a normalization layer's affine parameters show training: None without affine parameters.

    Initialisation sets each of gamma and beta to one constant per layer: 1 and 0 by default, but gamma = 0
    for the last BatchNorm of a residual branch (torchvision's ``zero_init_residual``, timm's
    ``zero_init_last`` in resnet26t, resnetrs, regnet, repvit) and other constants elsewhere; DCGAN-style
    code draws gamma around 1 but keeps beta at 0. Gradient steps move the channels of both apart, so they
    count as trained only when every one of them varies from channel to channel."""
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, torch.Tensor)]
    if not params:
        return None
    return all(_varies(p) for p in params)


def affine_frozen(m: nn.Module) -> bool:
    """True when the layer has affine parameters and none of them requires grad."""
    params = list(m.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _hash(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    # view as bytes so that every dtype (bfloat16 included) hashes without a numpy conversion
    raw = data.reshape(-1).view(torch.uint8) if data.numel() else data.reshape(-1)
    return hashlib.sha256(bytes(raw.numpy().tobytes()) + str((data.dtype, tuple(data.shape))).encode()).hexdigest()


def buffer_hashes(model: nn.Module) -> dict[str, str]:
    """sha256 of every buffer's bytes, dtype and shape, by qualified buffer name."""
    return {name: _hash(b) for name, b in model.named_buffers() if b is not None}


@contextmanager
def bn_statistics_mode(model: nn.Module):
    """BatchNorm layers in train mode, every other module in eval mode (dropout off), for the block; every
    module's own training flag is restored afterwards, whatever happens."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in model.modules():
            if is_batchnorm(m):
                m.train()
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


# --------------------------------------------------------------------------------------------- BN301


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

    seen: dict[str, set[str]] = {"batch": set(), "train": set(), "untracked": set(), "dropout": set()}

    def run(index: list[int], position: int = 0) -> torch.Tensor:
        handles = []
        with state.restoring():
            for name, m in model.named_modules():
                if is_batchnorm(m):
                    handles.append(m.register_forward_pre_hook(_bn_spy(name, seen)))
                elif is_dropout(m):
                    handles.append(m.register_forward_pre_hook(_dropout_spy(name, seen)))
            try:
                with seeded(seed, device):
                    out = _inference(model, take(pool, index), predict)
            finally:
                for h in handles:
                    h.remove()
        return sample_output(out, len(index), position)

    ref = run(reference)
    same = [run(index) for index in others]
    single, single_error = None, None
    try:
        single = run([0])
    except Exception as exc:  # noqa: BLE001 - a failure on one sample is itself the evidence
        single_error = _short_error(exc)
    scale = float(ref.abs().max()) if ref.numel() else 0.0

    def rel(d: float) -> float:
        return d / scale if scale > 0 else (0.0 if d == 0 else math.inf)

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


# --------------------------------------------------------------------------------------------- BN306


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


# --------------------------------------------------------------------------------------------- BN302/303


@dataclass(frozen=True)
class LayerFit:
    """How well one BatchNorm layer's running statistics describe the data.

    With m and v the layer's train-mode input mean and (unbiased) variance per channel, averaged over the
    batches the way ``momentum=None`` accumulates them, and eps the layer's epsilon:
    ``z = mean_c |m - running_mean| / sqrt(running_var + eps)`` (how far eval mode shifts the normalized
    output, in its own standard deviations) and ``r = mean_c (v + eps) / (running_var + eps)`` (how much eval
    mode mis-scales it; 1 is a perfect fit).

    Attributes:
        layer: qualified name.
        channels: number of channels.
        z, r: as above; None when the layer keeps no running statistics.
        z_max: the worst channel's shift.
        r_min, r_max: the extreme channels' variance ratios.
        calls: how many train-mode calls of the layer were averaged.
        samples: samples seen per channel (batch x spatial positions), summed over calls.
        tracks: whether the layer keeps running statistics at all.
        at_init: running_mean is all 0 and running_var all 1 (the values a fresh layer starts with).
        num_batches_tracked: the layer's counter, when it has one.
        affine_trained: whether weight and bias vary across channels, as training makes them and no
            initialisation does (``affine_trained``; None without affine).
        mean, var: the data's per-channel statistics (float64, CPU), for transforms that need them.
    """

    layer: str
    channels: int
    z: float | None
    r: float | None
    z_max: float | None
    r_min: float | None
    r_max: float | None
    calls: int
    samples: int
    tracks: bool
    at_init: bool
    num_batches_tracked: int | None
    affine_trained: bool | None
    mean: torch.Tensor | None = field(default=None, repr=False, compare=False)
    var: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FitResult:
    """``running_stats_fit`` for every BatchNorm layer that ran.

    Attributes:
        layers: layer name -> LayerFit, in model order.
        batches: how many batches went through.
        samples: how many samples went through.
        skipped: batches skipped and why (e.g. a batch of one sample cannot give a train-mode variance).
    """

    layers: Mapping[str, LayerFit]
    batches: int
    samples: int
    skipped: tuple[str, ...] = ()


class ChannelMoments:
    """Per-channel batch mean and unbiased variance, accumulated as a cumulative average over calls in
    float64: the estimate ``momentum=None`` running statistics converge to."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        if n < 2:
            return
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=True)
        self.calls += 1
        self.samples += n
        if self.mean is None:
            self.mean, self.var = mean, var
        else:
            self.mean = self.mean + (mean - self.mean) / self.calls
            self.var = self.var + (var - self.var) / self.calls


def layer_fit(name: str, m: nn.Module, moments: ChannelMoments) -> LayerFit:
    """Compare one layer's running buffers with the data statistics accumulated for it."""
    channels = int(getattr(m, "num_features", 0) or (moments.mean.numel() if moments.mean is not None else 0))
    tracks = tracks_running_stats(m)
    nbt_buf = getattr(m, "num_batches_tracked", None)
    nbt = int(nbt_buf) if isinstance(nbt_buf, torch.Tensor) else None
    trained = affine_trained(m)
    at_init = False
    z = r = z_max = r_min = r_max = None
    mean = moments.mean.cpu() if moments.mean is not None else None
    var = moments.var.cpu() if moments.var is not None else None
    if tracks:
        rm = m.running_mean.detach().to(torch.float64).cpu()
        rv = m.running_var.detach().to(torch.float64).cpu()
        at_init = bool(torch.all(rm == 0) and torch.all(rv == 1))
        if mean is not None and var is not None and mean.shape == rm.shape:
            eps = float(getattr(m, "eps", 1e-5))
            shift = (mean - rm).abs() / torch.sqrt(rv.clamp_min(0) + eps)
            ratio = (var + eps) / (rv.clamp_min(0) + eps)
            z, z_max = float(shift.mean()), float(shift.max())
            r, r_min, r_max = float(ratio.mean()), float(ratio.min()), float(ratio.max())
    return LayerFit(
        layer=name,
        channels=channels,
        z=z,
        r=r,
        z_max=z_max,
        r_min=r_min,
        r_max=r_max,
        calls=moments.calls,
        samples=moments.samples,
        tracks=tracks,
        at_init=at_init,
        num_batches_tracked=nbt,
        affine_trained=trained,
        mean=mean,
        var=var,
    )


def running_stats_fit(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    reference: nn.Module | None = None,
    state: ModelState | None = None,
) -> FitResult:
    """Collect each BatchNorm layer's train-mode input statistics on ``batches`` and compare them with the
    running buffers.

    The statistics come from the model with BatchNorm layers in train mode and everything else in eval mode:
    every layer then sees the inputs it sees during training (upstream layers normalize with batch
    statistics), without dropout noise, and its running buffers (as they were before these passes) can be
    compared with what the data says they should be.

    Args:
        model: the model whose data statistics are collected; put back as it was afterwards.
        batches: batches (``Batch`` objects or raw inputs); batches of one sample are skipped.
        reference: the model whose running buffers are compared (default ``model``); it must have the same
            BatchNorm layer names. ``recalibrate`` passes the recalibrated copy here.
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.

    Returns:
        A FitResult with one LayerFit per BatchNorm layer that ran.

    Raises:
        Exception: whatever the model's forward raises on a batch; callers turn it into DataError.
    """
    return fit_from_pass(train_mode_pass(model, batches, state=state), reference if reference is not None else model)


def fit_from_pass(passes: TrainModePass, reference: nn.Module) -> FitResult:
    """Compare the moments a ``train_mode_pass`` collected with ``reference``'s running buffers (the model's
    own, put back after the pass, or another model with the same BatchNorm layer names)."""
    out = {}
    for name, m in bn_layers(reference).items():
        mom = passes.moments.get(name)
        if mom is None or mom.calls == 0:
            continue
        out[name] = layer_fit(name, m, mom)
    return FitResult(out, passes.batches, passes.samples, passes.skipped)


@dataclass
class TrainModePass:
    """One pass over the batches with BatchNorm layers in train mode and everything else in eval mode.

    Attributes:
        moments: per BatchNorm layer, the per-channel mean and variance of its inputs (``ChannelMoments``).
        outputs: per batch that ran, the model's first output tensor (detached), for BN304.
        batches, samples: what went through.
        skipped: batches skipped and why.
    """

    moments: dict[str, ChannelMoments]
    outputs: list[torch.Tensor | None]
    batches: int
    samples: int
    skipped: tuple[str, ...]


def train_mode_pass(model: nn.Module, batches: Iterable[Any], *, state: ModelState | None = None) -> TrainModePass:
    """Run ``batches`` (those of two samples or more) through the model with BatchNorm in train mode and every
    other module in eval mode, under no_grad, collecting each BatchNorm's input moments and the outputs; the
    model is put back afterwards. ``running_stats_fit`` and ``train_eval_gap`` read the same pass.

    Raises:
        Exception: whatever the model's forward raises on a batch; callers turn it into DataError.
    """
    state = state_for(model, state)
    layers = bn_layers(model)
    moments = {name: ChannelMoments() for name in layers}
    outputs: list[torch.Tensor | None] = []
    count = samples = 0
    skipped = []
    with state.restoring():
        handles = [m.register_forward_pre_hook(collect_moments(moments[name])) for name, m in layers.items()]
        try:
            with bn_statistics_mode(model), torch.no_grad():
                for batch in batches:
                    inputs = getattr(batch, "inputs", batch)
                    n = batch_size(inputs) or 0
                    if n < 2:
                        skipped.append(f"a batch of {n} sample(s) (train-mode statistics need at least 2)")
                        outputs.append(None)
                        continue
                    out = first_output_tensor(forward(model, inputs))
                    outputs.append(out.detach() if out is not None else None)
                    count += 1
                    samples += n
        finally:
            for h in handles:
                h.remove()
    return TrainModePass(moments, outputs, count, samples, tuple(skipped))


def collect_moments(moments: ChannelMoments):
    """A forward pre-hook adding each call's input to ``moments``."""

    def hook(m: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            moments.add(args[0])

    return hook


# --------------------------------------------------------------------------------------------- BN304


@dataclass(frozen=True)
class GapResult:
    """Train-mode vs eval-mode quality on the same batches.

    Attributes:
        metric: ``cross_entropy`` (integer class targets), ``mse`` (float targets shaped like the output) or
            ``output`` (no usable targets: the relative RMS difference of the outputs).
        train_value, eval_value: the metric in train mode (BatchNorm on batch statistics, dropout off) and in
            eval mode. For ``output``: the RMS of each output.
        relative_change: for ``output``, RMS(train - eval) / RMS(eval); else (eval - train) / train.
        train_accuracy, eval_accuracy: for ``cross_entropy``, the top-1 accuracies.
        batches, samples: what went through.
        note: why the experiment could not run, when it could not.
    """

    metric: str = "output"
    train_value: float = 0.0
    eval_value: float = 0.0
    relative_change: float = 0.0
    train_accuracy: float | None = None
    eval_accuracy: float | None = None
    batches: int = 0
    samples: int = 0
    note: str = ""


def _metric_for(out: torch.Tensor, targets: Any) -> str:
    if not isinstance(targets, torch.Tensor) or out.dim() < 1 or targets.shape[:1] != out.shape[:1]:
        return "output"
    if not targets.is_floating_point() and not targets.is_complex():
        if out.dim() >= 2 and out.is_floating_point() and targets.dim() == out.dim() - 1:
            if targets.min() >= 0 and targets.max() < out.shape[1]:
                return "cross_entropy"
        return "output"
    if targets.is_floating_point() and targets.numel() == out.numel():
        return "mse"
    return "output"


def train_eval_gap(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    state: ModelState | None = None,
    train_pass: TrainModePass | None = None,
) -> GapResult:
    """Evaluate the same batches in eval mode and with BatchNorm in train mode.

    The eval-mode passes run first, on the untouched running statistics; the train-mode pass (which moves
    them) runs after, and the model is put back afterwards. Dropout stays off in both, so the gap measures
    normalization alone.

    Args:
        model: the model to probe; put back as it was afterwards.
        batches: ``Batch`` objects (with ``targets`` for a loss) or raw inputs; batches of one sample are
            skipped (train mode cannot normalize them).
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.
        train_pass: a ``train_mode_pass`` already run over the same batches (an audit shares it with BN302);
            None runs one here.

    Returns:
        A GapResult; ``note`` is set when no batch could be used.

    Raises:
        Exception: whatever the model's forward raises; callers turn it into DataError.
    """
    state = state_for(model, state)
    batches = list(batches)
    eval_outputs: list[torch.Tensor | None] = []
    with state.restoring(), torch.no_grad():
        model.eval()
        for batch in batches:
            inputs = getattr(batch, "inputs", batch)
            if (batch_size(inputs) or 0) < 2:
                eval_outputs.append(None)
                continue
            out = first_output_tensor(forward(model, inputs))
            eval_outputs.append(out.detach() if out is not None else None)
    if train_pass is None:
        train_pass = train_mode_pass(model, batches, state=state)
    metric = None
    sums = {"train": 0.0, "eval": 0.0, "diff": 0.0, "train_ok": 0.0, "eval_ok": 0.0}
    count = samples = elements = 0
    for batch, out_e, out_t in zip(batches, eval_outputs, train_pass.outputs):
        targets = getattr(batch, "targets", None)
        n = batch_size(getattr(batch, "inputs", batch)) or 0
        if n < 2 or out_e is None or out_t is None or out_e.shape != out_t.shape:
            continue
        if metric is None:
            metric = _metric_for(out_e, targets)
        kind = metric if _metric_for(out_e, targets) == metric else "output"
        if kind != metric:
            continue
        e, t = out_e.double(), out_t.double()
        if metric == "cross_entropy":
            sums["eval"] += float(nn.functional.cross_entropy(e, targets, reduction="sum"))
            sums["train"] += float(nn.functional.cross_entropy(t, targets, reduction="sum"))
            sums["eval_ok"] += float((e.argmax(1) == targets).sum())
            sums["train_ok"] += float((t.argmax(1) == targets).sum())
            elements += n
        elif metric == "mse":
            tgt = targets.double().reshape(e.shape)
            sums["eval"] += float(((e - tgt) ** 2).sum())
            sums["train"] += float(((t - tgt) ** 2).sum())
            elements += e.numel()
        else:
            sums["eval"] += float((e**2).sum())
            sums["train"] += float((t**2).sum())
            sums["diff"] += float(((t - e) ** 2).sum())
            elements += e.numel()
        count += 1
        samples += n
    if count == 0 or metric is None or elements == 0:
        return GapResult(note="no batch of two or more samples with a usable output")
    if metric == "output":
        train_v, eval_v = math.sqrt(sums["train"] / elements), math.sqrt(sums["eval"] / elements)
        diff = math.sqrt(sums["diff"] / elements)
        rel = diff / eval_v if eval_v > 0 else (0.0 if diff == 0 else math.inf)
        return GapResult("output", train_v, eval_v, rel, None, None, count, samples)
    train_v, eval_v = sums["train"] / elements, sums["eval"] / elements
    rel = (eval_v - train_v) / train_v if train_v > 0 else (0.0 if eval_v == train_v else math.inf)
    acc_t = sums["train_ok"] / samples if metric == "cross_entropy" else None
    acc_e = sums["eval_ok"] / samples if metric == "cross_entropy" else None
    return GapResult(metric, train_v, eval_v, rel, acc_t, acc_e, count, samples)


# --------------------------------------------------------------------------------------------- BN305


@dataclass(frozen=True)
class FrozenLayer:
    """A BatchNorm layer with frozen affine parameters that normalizes in train mode.

    Attributes:
        layer: qualified name.
        training_now: whether it is in train mode as given.
        training_after_train: whether it is in train mode after ``model.train()`` (False when the model
            overrides ``train()`` to keep it in eval mode).
        moved: whether one train-mode forward changed its running buffers (None without data).
        mean_shift: max |Δrunning_mean| / sqrt(running_var + eps) after that forward (None without data).
        var_ratio: max over channels of the larger of new/old and old/new running_var (None without data).
        num_batches_tracked: (before, after) of that forward, when the layer counts batches.
    """

    layer: str
    training_now: bool
    training_after_train: bool
    moved: bool | None = None
    mean_shift: float | None = None
    var_ratio: float | None = None
    num_batches_tracked: tuple[int, int] | None = None


@dataclass(frozen=True)
class FrozenResult:
    """``frozen_bn_drift`` over the whole model.

    Attributes:
        layers: the frozen BatchNorm layers that normalize in train mode (now or after ``model.train()``).
        frozen_total: how many BatchNorm layers have frozen affine parameters.
        trainable_params: how many parameters of the model require grad (0: nothing is being trained).
        forward_ran: whether a train-mode forward measured the drift.
    """

    layers: tuple[FrozenLayer, ...] = ()
    frozen_total: int = 0
    trainable_params: int = 0
    forward_ran: bool = False


def frozen_bn_drift(
    model: nn.Module,
    batch: Any | None = None,
    *,
    device: torch.device | str | None = None,
    state: ModelState | None = None,
) -> FrozenResult:
    """Find BatchNorm layers whose affine parameters are frozen (``requires_grad=False``) but that run in
    train mode now, or will after ``model.train()``, and measure how far one train-mode forward moves their
    running buffers.

    Args:
        model: the model to probe; put back as it was afterwards (``train()`` is called on it, which also
            honours a ``train()`` override that keeps frozen layers in eval mode).
        batch: one batch (``Batch`` or raw inputs) for the forward pass; None measures nothing.
        device: the device the batch lives on (its RNG is restored after the forward).
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.

    Returns:
        A FrozenResult.

    Raises:
        Exception: whatever the model's forward raises; callers turn it into DataError.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    now = {name: m.training for name, m in bn_layers(model).items()}
    frozen = {name: m for name, m in bn_layers(model).items() if affine_frozen(m)}
    if not frozen:
        return FrozenResult((), 0, trainable, False)
    state = state_for(model, state)
    with state.restoring():
        model.train()
        layers = bn_layers(model)
        candidates = {
            name: m for name, m in layers.items()
            if name in frozen and tracks_running_stats(m) and (now.get(name) or m.training)
        }
        if not candidates:
            return FrozenResult((), len(frozen), trainable, False)
        before = {
            name: (m.running_mean.detach().clone(), m.running_var.detach().clone(), _nbt(m))
            for name, m in candidates.items()
        }
        ran = False
        inputs = getattr(batch, "inputs", batch) if batch is not None else None
        if inputs is not None and (batch_size(inputs) or 0) >= 2:
            # Train mode exactly as model.train() leaves it (dropout included), under no_grad: buffers still move.
            with torch.no_grad(), seeded(0, device):
                forward(model, inputs)
            ran = True
        out = []
        for name, m in candidates.items():
            rm0, rv0, nbt0 = before[name]
            moved = shift = ratio = nbt = None
            if ran:
                rm1, rv1 = m.running_mean.detach(), m.running_var.detach()
                eps = float(getattr(m, "eps", 1e-5))
                shift = float(((rm1.double() - rm0.double()).abs() / torch.sqrt(rv0.double().clamp_min(0) + eps)).max())
                a, b = rv0.double().clamp_min(0) + eps, rv1.double().clamp_min(0) + eps
                ratio = float(torch.maximum(a / b, b / a).max())
                moved = not (torch.equal(rm0, rm1) and torch.equal(rv0, rv1))
                nbt1 = _nbt(m)
                nbt = (nbt0, nbt1) if nbt0 is not None and nbt1 is not None else None
            out.append(FrozenLayer(name, bool(now.get(name)), bool(m.training), moved, shift, ratio, nbt))
    return FrozenResult(tuple(out), len(frozen), trainable, ran)


def _nbt(m: nn.Module) -> int | None:
    t = getattr(m, "num_batches_tracked", None)
    return int(t) if isinstance(t, torch.Tensor) else None


# --------------------------------------------------------------------------------------------- BN307


@dataclass(frozen=True)
class EvalModeSpan:
    """Optimizer steps during which one trainable BatchNorm layer sat in eval mode.

    Attributes:
        layer: qualified name.
        steps: the recorded steps (as numbered in the history) counted against it.
        total_steps: recorded steps in the history.
        trained_steps: recorded steps at which it was trainable and an optimizer step ran.
        first, last: the first and last counted step.
        stalled_at: its ``num_batches_tracked`` at the first counted step (None when it has no counter).
        confirmed: whether the counter confirmed every counted step (it did not advance there).
    """

    layer: str
    steps: tuple[int, ...]
    total_steps: int
    trained_steps: int
    first: int
    last: int
    stalled_at: int | None
    confirmed: bool


def eval_mode_steps(
    steps: Sequence[int],
    training: Mapping[str, Sequence[bool]],
    requires_grad: Mapping[str, Sequence[bool]],
    num_batches_tracked: Mapping[str, Sequence[int]] | None = None,
    updated: Sequence[bool] | None = None,
) -> list[EvalModeSpan]:
    """Find trainable BatchNorm layers that sat in eval mode through recorded optimizer steps.

    Works over plain per-step series (one entry per recorded step, read at the end of the step) so any
    recorder can feed it. A step counts against a layer when its affine parameters require grad, an
    optimizer step ran (``updated``), its training flag is False and, when a counter is given, its
    ``num_batches_tracked`` did not advance since the previous recorded step. The counter check matters: the
    flag is read at the end of a step, so the step in which a validation pass switched the model to eval
    mode shows ``training=False`` although its forward ran in train mode (its counter advanced). A counter of
    -1 marks a layer without running statistics; such a layer normalizes with batch statistics in eval mode
    too, so it is never counted.

    Args:
        steps: the recorded step numbers.
        training: layer -> training flag per step.
        requires_grad: layer -> whether its affine parameters require grad, per step (pass True for a layer
            without affine parameters in a model that trains).
        num_batches_tracked: layer -> counter per step, when recorded.
        updated: per step, whether any parameter changed (an optimizer step ran); None: every step did.

    Returns:
        One EvalModeSpan per layer with at least one counted step, by layer name.
    """
    total = len(steps)
    spans = []
    for layer in sorted(training):
        flags = list(training[layer])
        grads = list(requires_grad.get(layer, [True] * len(flags)))
        counts = list((num_batches_tracked or {}).get(layer, []))
        n = min(len(flags), len(grads), total)
        trained = [i for i in range(n) if grads[i] and (updated is None or bool(updated[i]))]
        hits = []
        confirmed = True
        for i in trained:
            if flags[i]:
                continue
            if counts:
                if i >= len(counts) or counts[i] < 0:
                    continue  # no running statistics: eval mode changes nothing
                if i == 0 or counts[i - 1] < 0 or counts[i] != counts[i - 1]:
                    continue  # the counter advanced: the forward of this step ran in train mode
            else:
                confirmed = False
            hits.append(i)
        if not hits:
            continue
        spans.append(
            EvalModeSpan(
                layer=layer,
                steps=tuple(int(steps[i]) for i in hits),
                total_steps=total,
                trained_steps=len(trained),
                first=int(steps[hits[0]]),
                last=int(steps[hits[-1]]),
                stalled_at=int(counts[hits[0]]) if counts else None,
                confirmed=confirmed,
            )
        )
    return spans


def history_eval_mode_steps(history: Any) -> list[EvalModeSpan]:
    """``eval_mode_steps`` over a recorded History (``bnaudit.record(...).history``, or the Recorder).

    Raises:
        TypeError: ``history`` offers no ``bn_layers`` / ``bn_modes(layer)`` accessor.
    """
    history = getattr(history, "history", history)
    if not hasattr(history, "bn_layers") or not hasattr(history, "bn_modes"):
        raise TypeError(f"a {type(history).__name__} is not a recorded History (bnaudit.record(...).history)")
    training: dict[str, list[bool]] = {}
    grads: dict[str, list[bool]] = {}
    counts: dict[str, list[int]] = {}
    steps: list[int] = []
    updated: list[bool] | None = None
    info = getattr(history, "bn_info", {})
    for layer in history.bn_layers:
        modes = history.bn_modes(layer)
        steps = [int(s) for s in modes.steps]
        training[layer] = [bool(v) for v in modes.training]
        if info.get(layer, {}).get("affine") is False:
            # no affine parameters: it is part of whatever trains, and its statistics stall all the same
            grads[layer] = [True] * len(training[layer])
        else:
            grads[layer] = [bool(v) for v in modes.requires_grad]
        counts[layer] = [int(v) for v in modes.num_batches_tracked]
        updated = [bool(v) for v in modes.updated]
    return eval_mode_steps(steps, training, grads, counts, updated)


__all__ = [
    "NOISE_MARGIN",
    "BufferChange",
    "CobatchResult",
    "EvalModeSpan",
    "FitResult",
    "FrozenLayer",
    "FrozenResult",
    "GapResult",
    "LayerFit",
    "MutationResult",
    "affine_trained",
    "batch_size",
    "bn_layers",
    "bn_statistics_mode",
    "buffer_hashes",
    "ChannelMoments",
    "collect_moments",
    "cobatch_invariance",
    "concat",
    "eval_mode_steps",
    "fit_from_pass",
    "forward",
    "layer_fit",
    "frozen_bn_drift",
    "history_eval_mode_steps",
    "predict_mutations",
    "running_stats_fit",
    "predict_train_mode_layers",
    "sample_output",
    "seeded",
    "take",
    "train_eval_gap",
    "train_mode_pass",
    "TrainModePass",
]
