"""The ``inspect --data`` dynamic probe behind the data rules (BN201-BN209).

One pass over a few batches (``ctx.steps``) of the user's data through the audit's copy of the model, with
BatchNorm layers in train mode (so they use, and we see, batch statistics) and everything else in eval mode
(dropout off, so the numbers describe the data rather than dropout noise); no gradient, no optimizer step.
``bnaudit.record`` collects per-layer, per-channel statistics batch by batch (one recorded step per batch),
and a few extra hooks measure what moments cannot: the fraction of positions whose whole channel vector is
zero at each BatchNorm input (padding, BN205), units of ReLU-like activations never positive (BN208) and
sigmoid/tanh inputs in the flat tails (BN208). The model's inputs and targets are summarised on the way
(BN201, BN204). The audited model, its buffers and the global RNG are untouched: the probe runs on the
audit's copy, which is put back afterwards (``probes.state.ModelState``), and the RNG is forked. A batch the
model rejects in train mode (a batch of one at a BatchNorm) is recorded
as an error instead of stopping the audit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bnaudit.layers import is_batchnorm, is_dropout
from bnaudit.probes.state import audit_state
from bnaudit.recording import History, record
from bnaudit.stats import Moments

if TYPE_CHECKING:
    from bnaudit.context import RuleContext

__all__ = ["SATURATION", "DataProbe", "data_probe", "run_data_probe"]

_RELU_LIKE = (nn.ReLU, nn.ReLU6)
# |input| beyond which the activation's slope is below ~1% of its maximum: the flat tails.
SATURATION = {nn.Sigmoid: 5.0, nn.Tanh: 3.0, nn.Hardtanh: 1.0, nn.Hardsigmoid: 3.0}
_TARGET_BATCHES = 64  # batches read (inputs untouched, no model call) to judge label order of unshuffled loaders


@dataclass
class DataProbe:
    """What the probe saw.

    Attributes:
        history: per-batch statistics of every default-recorded layer (one step per batch).
        batch_sizes: sizes of the batches that ran.
        errors: batch index -> the model's error on it (train mode).
        input: per-feature moments of float inputs (``mean``, ``std`` arrays, ``layout``), or None.
        targets: integer class labels per probe batch (None when targets are not class labels).
        order_targets: labels from up to 64 batches of an unshuffled loader, in loader order (else None).
        zero_positions: BN layer -> fraction of positions (samples x spatial) whose whole channel vector is 0.
        zero_samples: BN layer -> that fraction per sample (one value per sample, over all batches).
        dead: ReLU-like layer -> (units never positive, units).
        saturated: sigmoid/tanh layer -> (fraction of inputs in the flat tails, threshold).
        spatial: BN layer -> values per channel per sample (H*W, L or 1).
    """

    history: History
    batch_sizes: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    input: dict[str, Any] | None = None
    targets: list[np.ndarray] | None = None
    order_targets: np.ndarray | None = None
    zero_positions: dict[str, float] = field(default_factory=dict)
    zero_samples: dict[str, np.ndarray] = field(default_factory=dict)
    dead: dict[str, tuple[int, int]] = field(default_factory=dict)
    saturated: dict[str, tuple[float, float]] = field(default_factory=dict)
    spatial: dict[str, int] = field(default_factory=dict)


def data_probe(ctx: RuleContext) -> DataProbe:
    """The probe for this audit, run once and shared by every data rule."""

    def compute() -> DataProbe:
        with audit_state(ctx).restoring() as model:
            probe = run_data_probe(model, ctx.batches(), device=ctx.device)
        if ctx.data is not None and ctx.data.shuffled is not True:
            probe.order_targets = _loader_targets(ctx.data)
        return probe

    return ctx.cached("data_probe", compute)


def _labels(targets: Any) -> np.ndarray | None:
    """Integer class labels as a 1-D array, or None when the targets are something else."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.numel() == 0:
        return None
    t = targets.detach().cpu()
    if t.is_floating_point():
        if not torch.equal(t, t.round()) or t.unique().numel() > 100:
            return None
    elif t.dtype == torch.bool:
        t = t.long()
    return t.long().numpy()


def _loader_targets(data: Any) -> np.ndarray | None:
    from bnaudit.loading.data import split_batch

    out = []
    try:
        for i, raw in enumerate(data.raw_batches(_TARGET_BATCHES)):
            labels = _labels(split_batch(raw, data.input_key, data.spec).targets)
            if labels is None:
                return None
            out.append(labels)
    except Exception:  # noqa: BLE001 - the label-order check is optional; the probe proper already ran
        return None
    return np.concatenate(out) if out else None


class _Hooks:
    """What moments cannot show, measured by hooks during the probe's forward passes: the fraction of positions
    whose whole channel vector is zero at each BatchNorm input (padding, BN205), the units of ReLU-like
    activations ever positive (BN208), and sigmoid/tanh inputs in the flat tails (BN208)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.zeros: dict[str, list[float]] = {}
        self.per_sample: dict[str, list[torch.Tensor]] = {}
        self.active: dict[str, torch.Tensor] = {}
        self.tails: dict[str, list[float]] = {}
        self.sat_at: dict[str, float] = {}
        self.spatial: dict[str, int] = {}

    def zero_hook(self, name: str):
        zeros, spatial, per_sample = self.zeros, self.spatial, self.per_sample

        def hook(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.is_floating_point():
                spatial[name] = int(x[0, 0].numel())
                all_zero = (x == 0).all(dim=1)  # a whole channel vector zero at a position: padding
                zeros.setdefault(name, [0.0, 0.0])
                zeros[name][0] += float(all_zero.sum())
                zeros[name][1] += all_zero.numel()
                # padding comes per sample: its fraction per sample is what BN205's confidence bound needs
                flat = all_zero.flatten(1) if all_zero.dim() > 1 else all_zero[:, None]
                per_sample.setdefault(name, []).append(flat.double().mean(1).cpu())
        return hook

    def relu_hook(self, name: str):
        active = self.active

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.is_floating_point():
                # dim 0 is the batch and dim 1 the units; a 1-D output is one unit seen over the batch
                dims = tuple(d for d in range(out.dim()) if d != 1)
                pos = (out > 0).any(dim=dims)
                active[name] = pos if name not in active or active[name].shape != pos.shape else active[name] | pos
        return hook

    def tail_hook(self, name: str, limit: float):
        tails = self.tails

        def hook(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                tails.setdefault(name, [0.0, 0.0])
                tails[name][0] += float((x.abs() > limit).sum())
                tails[name][1] += x.numel()
        return hook

    def install(self, model: nn.Module) -> None:
        """Hook every BatchNorm, ReLU-like and saturating layer of ``model``; dropout is put in eval mode."""
        for name, m in model.named_modules():
            if not name:
                continue
            if is_batchnorm(m):
                self.handles.append(m.register_forward_pre_hook(self.zero_hook(name)))
            elif isinstance(m, _RELU_LIKE):
                self.handles.append(m.register_forward_hook(self.relu_hook(name)))
            else:
                for kind, limit in SATURATION.items():
                    if type(m) is kind:
                        self.sat_at[name] = limit
                        self.handles.append(m.register_forward_pre_hook(self.tail_hook(name, limit)))
            if is_dropout(m):
                m.eval()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def fill(self, probe: DataProbe) -> None:
        """Write the tallies into ``probe`` as fractions and counts."""
        probe.zero_positions = {k: v[0] / v[1] for k, v in self.zeros.items() if v[1]}
        probe.zero_samples = {k: torch.cat(v).numpy() for k, v in self.per_sample.items()}
        probe.dead = {k: (int((~v).sum()), int(v.numel())) for k, v in self.active.items()}
        probe.saturated = {k: (v[0] / v[1], self.sat_at[k]) for k, v in self.tails.items() if v[1]}
        probe.spatial = self.spatial


@dataclass
class _Seen:
    """What the probe notes of the batches on the way: their sizes, the model's errors, the targets as class
    labels (None once a batch has other targets), and the per-feature moments of float inputs."""

    sizes: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    targets: list[np.ndarray] | None = field(default_factory=list)
    moments: Moments | None = None
    layout: str | None = None

    def add_inputs(self, x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            self.layout = self.layout or ("features" if x.dim() == 2 else "channels")
            if self.moments is None:
                self.moments = Moments(channel_dim=1)
            try:
                self.moments.update(x)
            except ValueError:
                pass

    def add_targets(self, targets: Any) -> None:
        labels = _labels(targets)
        if self.targets is not None:
            if labels is None:
                self.targets = None
            else:
                self.targets.append(labels)

    def input_summary(self) -> dict[str, Any] | None:
        if self.moments is None or self.moments.mean is None:
            return None
        host = self.moments.to_numpy()
        return {"mean": host["mean"], "std": np.sqrt(host["var"]), "layout": self.layout,
                "nonfinite_frac": host["nonfinite_frac"], "min": host["min"], "max": host["max"]}


def _run_batches(model: nn.Module, batches: Iterable[Any], rec: Any, seen: _Seen) -> None:
    """One forward pass per batch, one recorded step each; a batch the model rejects is noted, not raised."""
    for i, batch in enumerate(batches):
        x = batch.inputs
        seen.add_inputs(x)
        seen.add_targets(batch.targets)
        try:
            model(x)
        except Exception as exc:  # noqa: BLE001 - e.g. a batch of one at a train-mode BatchNorm
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            seen.errors[i] = f"{type(exc).__name__}: {text[:200]}"
        else:
            seen.sizes.append(int(batch.size or 0))
        rec.step()


def run_data_probe(model: nn.Module, batches: Iterable[Any], *, device: torch.device | str | None = None) -> DataProbe:
    """Run the probe on ``model`` (whose modes and buffers it changes: pass a copy, or put it back after)
    over ``batches`` (Batch objects).

    Args:
        model: the audited model (a private copy), on its device.
        batches: ``Batch(inputs, targets)`` objects on that device.
        device: the device, for the forked RNG.

    Returns:
        The DataProbe.
    """
    model.eval()
    for m in model.modules():
        if is_batchnorm(m):
            m.train()
    hooks = _Hooks()
    hooks.install(model)
    seen = _Seen()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(0)
            with record(model) as rec:
                _run_batches(model, batches, rec, seen)
    finally:
        hooks.remove()
    probe = DataProbe(history=rec.history, batch_sizes=seen.sizes, errors=seen.errors, targets=seen.targets or None)
    probe.input = seen.input_summary()
    hooks.fill(probe)
    return probe
