"""BN2xx: what the data does to normalization, measured on real batches (``inspect --data``) or on a recorded
training history (``bnaudit.record``).

The batch rules share one probe (``bnaudit.probes.data``): a few train-mode forward passes of a copy of the
model, no optimizer step. BN206 reads ``ctx.history``, the History ``bnaudit.record`` produced. Each rule's
docstring is its documentation (``bnaudit rules BN203``), with its options as YAML and a bad/good example."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.errors import ConfigError
from bnaudit.findings import Finding
from bnaudit.graph import INPUT
from bnaudit.layers import is_batchnorm, is_norm, is_weight_layer
from bnaudit.probes.data import data_probe
from bnaudit.recording.measures import depth_trend, drift_all
from bnaudit.rules import examples_data as ex
from bnaudit.rules.base import Example, Rule, register


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _bn_names(ctx: RuleContext) -> list[str]:
    return [n for n, m in ctx.model.named_modules() if n and is_batchnorm(m)]


# --- rules --------------------------------------------------------------------------------------------------


@register
class UnnormalizedInput(Rule):
    """Input features on wildly different scales, or far from zero, reach the first layer unnormalized.

    Gradient descent on features of different scales is ill-conditioned: an "age" in tens and an "income" in
    tens of thousands give the first layer's weights gradients that differ by orders of magnitude, so one
    learning rate is too big for one and too small for the other, and features with a large mean push the
    first pre-activations off-centre (LeCun et al., "Efficient BackProp", 1998). Standardizing the inputs, or
    a BatchNorm before the first weight layer, fixes both.

    Measured on the probe batches: per input feature (per channel for images) the mean and standard deviation.
    Fires when the largest standard deviation is more than ``max_scale_ratio`` times the smallest non-zero one,
    or when some feature's ``|mean| / std`` exceeds ``max_mean_to_std``. Skipped when the input goes straight
    into a normalization layer.

    Options:
        ```yaml
        max_scale_ratio: 100.0   # largest / smallest feature std
        max_mean_to_std: 3.0     # |mean| / std of any one feature
        ```

    Bad:
        X = df[["age", "income"]].to_numpy()          # 40 +- 12 and 60000 +- 25000
    Good:
        X = StandardScaler().fit_transform(X)         # or nn.BatchNorm1d(2) as the first layer
    """

    code = "BN201"
    name = "unnormalized-input"
    severity = "warning"
    summary = "input features differ in scale by orders of magnitude, or sit far from zero"
    fix = "standardize the inputs (x - mean) / std (e.g. sklearn StandardScaler), or put a BatchNorm before the first layer"
    family = "data"
    requires = frozenset({"data"})
    options = {"max_scale_ratio": float, "max_mean_to_std": float}
    defaults = {"max_scale_ratio": 100.0, "max_mean_to_std": 3.0}
    invalid = (Example(lambda: ex.mlp(2), ex.age_income, note="age and income in raw units"),)
    valid = (
        Example(ex.mlp, ex.standardized, note="standardized features"),
        Example(lambda: nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)), ex.age_income,
                note="a BatchNorm at the input"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        if probe.input is None:
            return
        if ctx.graph is not None:
            firsts = [e.dst for e in ctx.graph.children(INPUT) if e.dst in ctx.graph.nodes]
            if firsts and all(is_norm(ctx.graph.nodes[d].module) for d in firsts):
                return
        mean, std = probe.input["mean"], probe.input["std"]
        what = "feature" if probe.input["layout"] == "features" else "channel"
        live = std > 1e-12
        if live.sum() == 0:
            return
        ev: dict = {"features": len(std), "layout": probe.input["layout"]}
        problems = []
        ratio = float(std[live].max() / std[live].min())
        if ratio > self.config["max_scale_ratio"]:
            hi, lo = int(np.argmax(np.where(live, std, -np.inf))), int(np.argmin(np.where(live, std, np.inf)))
            problems.append(f"{what} scales differ {_fmt(ratio)}x ({what} {hi}: std {_fmt(std[hi])}, {what} {lo}: "
                            f"std {_fmt(std[lo])})")
            ev.update(scale_ratio=ratio, largest_std_feature=hi, smallest_std_feature=lo,
                      max_scale_ratio=self.config["max_scale_ratio"])
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(live, np.abs(mean) / np.where(live, std, 1.0), 0.0)
        far = np.nonzero(off > self.config["max_mean_to_std"])[0]
        if len(far):
            worst = int(far[np.argmax(off[far])])
            problems.append(f"{len(far)} {what}(s) sit far from zero (worst: {what} {worst}, mean {_fmt(mean[worst])} "
                            f"= {_fmt(off[worst])} std)")
            ev.update(off_centre_features=[int(i) for i in far[:20]], worst_mean_to_std=float(off[worst]),
                      max_mean_to_std=self.config["max_mean_to_std"])
        if problems:
            yield self.finding(None, "inputs are not normalized: " + "; ".join(problems), ev)


@register
class TooFewValuesPerChannel(Rule):
    """A BatchNorm layer will see too few values per channel in some training batch.

    Train-mode BatchNorm normalizes each channel with the mean and variance of the values it sees in the
    batch: N values for (N, C) inputs, N*L or N*H*W otherwise. With one value the variance is undefined and
    PyTorch raises "Expected more than 1 value per channel when training"; with a handful the statistics are
    so noisy that training is erratic. The smallest batch is often the last one: ``len(dataset) %
    batch_size`` samples when the loader does not ``drop_last``.

    Measured: values per channel at each BatchNorm for the smallest batch the loader will produce (from its
    batch size, dataset length and drop_last), and for every batch the probe ran. Below 2 is an error, below
    ``min_values`` a warning.

    Options:
        ```yaml
        min_values: 8   # values per channel below which batch statistics are too noisy
        ```

    Bad:
        DataLoader(ds, batch_size=32)                  # len(ds) = 65: the last batch has 1 sample
    Good:
        DataLoader(ds, batch_size=32, drop_last=True)  # or a batch size that divides the dataset
    """

    code = "BN202"
    name = "too-few-values-per-channel"
    severity = "warning"
    summary = "a BatchNorm layer sees too few values per channel in some batch"
    fix = "pass drop_last=True to the DataLoader, raise the batch size, or use GroupNorm/LayerNorm where batches must stay small"
    family = "data"
    requires = frozenset({"data"})
    options = {"min_values": int}
    defaults = {"min_values": 8}
    invalid = (
        Example(ex.mlp_bn, ex.odd_dataset, layer="1", note="65 samples, batch 32: a last batch of one"),
        Example(ex.mlp_bn, ex.tiny_batches, layer="1", note="batches of 4"),
    )
    valid = (
        Example(ex.mlp_bn, ex.even_dataset, note="64 samples, batch 32"),
        Example(ex.conv_bn, ex.small_image_batches, note="NCHW: 4 samples x 2 x 2 positions = 16 values per channel"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        data = ctx.data
        smallest = data.smallest_batch if data is not None else None
        seen = min(probe.batch_sizes) if probe.batch_sizes else None
        candidates = [b for b in (smallest, seen) if b]
        for name in _bn_names(ctx):
            per_sample = probe.spatial.get(name)
            if per_sample is None:
                continue
            batch = min(candidates) if candidates else None
            if batch is None:
                continue
            values = batch * per_sample
            ev = {"values_per_channel": values, "batch": batch, "values_per_sample": per_sample,
                  "batch_size": getattr(data, "batch_size", None), "dataset_len": getattr(data, "dataset_len", None),
                  "drop_last": getattr(data, "drop_last", None), "min_values": self.config["min_values"]}
            where = "the last batch" if smallest is not None and batch == smallest and smallest != getattr(data, "batch_size", None) else "a batch"
            if values < 2:
                err = next(iter(probe.errors.values()), None)
                if err:
                    ev["error"] = err
                yield self.finding(name, f"{where} of {batch} sample(s) gives {name} {values} value per channel: training "
                                   "fails with 'Expected more than 1 value per channel when training'", ev, severity="error")
            elif values < self.config["min_values"]:
                yield self.finding(name, f"{where} of {batch} sample(s) gives {name} only {values} values per channel "
                                   f"(< {self.config['min_values']}): its batch statistics are very noisy", ev)


def _chi2_quantile(p: float, k: int) -> float:
    """The ``p``-quantile of the chi-square distribution with ``k`` degrees of freedom.

    Wilson-Hilferty's cube-root normal approximation (no scipy): within 1% of the exact quantile for k >= 2 at
    p = 0.95 (k = 7: 14.05 against 14.07), within 3% at k = 1."""
    z = NormalDist().inv_cdf(p)
    h = 2.0 / (9.0 * k)
    return k * max(1.0 - h + z * math.sqrt(h), 0.0) ** 3


def _std_lower_factor(batches: int, confidence: float) -> float:
    """Factor from a standard deviation over ``batches`` values (divided by ``batches``, as numpy's default)
    to its one-sided lower confidence bound: ``sqrt(batches / _chi2_quantile(confidence, batches - 1))``.

    For normal values ``batches * s**2 / sigma**2`` follows chi-square with ``batches - 1`` degrees of freedom,
    so sigma exceeds ``s * factor`` with probability ``confidence``. 8 batches at 95%: 0.754; 32: 0.843."""
    return math.sqrt(batches / _chi2_quantile(confidence, batches - 1))


def _t_quantile(p: float, dof: int) -> float:
    """The ``p``-quantile of Student's t distribution with ``dof`` degrees of freedom.

    The Cornish-Fisher expansion in 1/dof around the normal quantile (Abramowitz & Stegun 26.7.5; no scipy):
    at p = 0.95 within 0.3% of the exact quantile for dof >= 2 (dof = 3: 2.352 against 2.353), 5% low at 1."""
    z = NormalDist().inv_cdf(p)
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / dof ** (i + 1) for i, g in enumerate(terms))


@register
class BatchStatNoise(Rule):
    """Batch statistics are noisy at this batch size: each step normalizes with a different mean and variance.

    Train-mode BatchNorm normalizes with the batch's mean and variance, which fluctuate around the
    population's by about 1/sqrt(values per channel) for independent samples. When that noise is large the
    network trains on a jittering normalization and the running statistics used at inference time disagree
    with what training saw (Ioffe 2017, "Batch Renormalization"; Wu & He 2018, "Group Normalization").

    Measured over the probe batches, per BatchNorm and channel: the standard deviation over batches of the
    batch mean divided by the population standard deviation (``mean_noise``), and of the ratio batch variance
    / population variance (``var_noise``). The median over channels (``mean_noise_median``) is an estimate
    from B batches (``--steps``, default 8) and itself noisy: a standard deviation from B values has a
    relative standard error of about 1/sqrt(2(B-1)), 27% at B = 8. So the rule fires only when a one-sided
    lower confidence bound on it (``mean_noise_lower``) exceeds ``max_mean_noise``: the median times
    sqrt(B / q), q the ``confidence`` quantile of chi-square with B - 1 degrees of freedom (the bound on the
    standard deviation of normal batch means; the factor is 0.754 at B = 8 and 95%, 0.843 at B = 32). A
    layer measured at 0.33 on 8 batches is within its noise of 0.3 and is not reported; on 8 batches the
    median must exceed about 0.4. The channels share the batches, so their estimates err together: the
    bound treats the median as one channel's estimate, not as if the channels were independent. More
    ``--steps`` tighten it; BN202 still counts values per channel exactly. For scale: a healthy CIFAR-style
    ResNet at batch 128 measures about 0.01 (thousands of values per channel), batches of 4 about 0.5.

    Options:
        ```yaml
        max_mean_noise: 0.3   # std of batch means in population stds (1/sqrt(11) for 11 iid values)
        confidence: 0.95      # of the one-sided lower bound that must exceed max_mean_noise (0.5 to < 1)
        min_batches: 3        # batches needed to measure anything (at least 2)
        ```

    Bad:
        DataLoader(ds, batch_size=4)   # with BatchNorm1d after every Linear layer
    Good:
        DataLoader(ds, batch_size=64)  # or nn.GroupNorm / SyncBatchNorm / batch renormalization
    """

    code = "BN203"
    name = "batch-stat-noise"
    severity = "warning"
    summary = "batch statistics fluctuate strongly between batches at this batch size"
    fix = ("use larger batches (or SyncBatchNorm across devices), or swap to GroupNorm/LayerNorm "
           "(`bnaudit swap-norm`), or batch renormalization")
    family = "data"
    requires = frozenset({"data"})
    options = {"max_mean_noise": float, "confidence": float, "min_batches": int}
    defaults = {"max_mean_noise": 0.3, "confidence": 0.95, "min_batches": 3}
    invalid = (
        Example(ex.mlp_bn, ex.tiny_batches, layer="1", note="batches of 4"),
        Example(lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)), lambda: ex.mean_noise_batches(0.6), layer="0",
                note="batch means spread 0.6 population stds over 8 batches: far above 0.3"),
    )
    valid = (
        Example(ex.mlp_bn, lambda: ex.standardized(512), note="batches of 32"),
        Example(lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)), lambda: ex.mean_noise_batches(0.33),
                note="batch means spread 0.33 population stds over 8 batches: above 0.3, within its noise"),
    )

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().resolve_options(options)
        if not 0.5 <= merged["confidence"] < 1.0:
            raise ConfigError(f"{cls.code} option 'confidence' must be at least 0.5 and below 1, "
                              f"got {merged['confidence']!r}")
        if merged["min_batches"] < 2:
            raise ConfigError(f"{cls.code} option 'min_batches' must be at least 2, got {merged['min_batches']!r}")
        return merged

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        h = probe.history
        limit, confidence = self.config["max_mean_noise"], self.config["confidence"]
        for name in _bn_names(ctx):
            if name not in h.info:
                continue
            cm = h.series(name, "channel_mean")
            cv = h.series(name, "channel_var")
            ok = np.isfinite(cm).all(axis=1)
            cm, cv = cm[ok], cv[ok]
            if len(cm) < self.config["min_batches"]:
                continue
            pop_mean = cm.mean(axis=0)
            pop_var = cv.mean(axis=0) + cm.var(axis=0)
            live = pop_var > 1e-12
            if not live.any():
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                mean_noise = cm.std(axis=0)[live] / np.sqrt(pop_var[live])
                var_noise = (cv[:, live] / pop_var[live]).std(axis=0)
            med = float(np.median(mean_noise))
            lower = med * _std_lower_factor(len(cm), confidence)
            if lower > limit:
                counts = h.series(name, "count")[ok]
                yield self.finding(
                    name,
                    f"{name}'s batch means move by {_fmt(med)} population stds between batches (median over channels; "
                    f"at least {_fmt(lower)} at {_fmt(100 * confidence)}% confidence from {len(cm)} batches; batch "
                    f"variance ratio spread {_fmt(float(np.median(var_noise)))}) at {int(np.median(counts))} values "
                    "per channel",
                    {"mean_noise_median": med, "mean_noise_lower": lower, "confidence": confidence,
                     "mean_noise_max": float(mean_noise.max()),
                     "var_ratio_spread_median": float(np.median(var_noise)), "values_per_channel": int(np.median(counts)),
                     "batches": len(cm), "max_mean_noise": limit,
                     "population_mean_abs_max": float(np.abs(pop_mean).max())},
                )


@register
class NonIidBatches(Rule):
    """Batches are not random samples of the data: each holds mostly one class.

    BatchNorm's batch statistics are meant to estimate the population's. When a loader serves sorted or
    grouped data (no ``shuffle=True``, a sampler that groups classes, a dataset concatenated class by class),
    each batch's mean and variance describe one class; the network learns to exploit the batch composition,
    running statistics are a drifting average of per-class statistics, and eval-mode accuracy collapses.

    Measured on integer class targets: the mean label purity of a batch (share of its most common class)
    against the purity of the same labels reshuffled into batches of the same sizes, over the probe batches;
    for a loader that does not shuffle, also whether the labels of up to 64 batches come in sorted order.

    Options:
        ```yaml
        max_purity_excess: 0.25   # batch purity above the reshuffled purity
        ```

    Bad:
        DataLoader(ds_sorted_by_label, batch_size=32)
    Good:
        DataLoader(ds_sorted_by_label, batch_size=32, shuffle=True)
    """

    code = "BN204"
    name = "non-iid-batches"
    severity = "warning"
    summary = "batches are dominated by one class (unshuffled or grouped data)"
    fix = "shuffle the training data (DataLoader(..., shuffle=True)) or use a sampler that mixes classes in every batch"
    family = "data"
    requires = frozenset({"data"})
    options = {"max_purity_excess": float}
    defaults = {"max_purity_excess": 0.25}
    invalid = (Example(ex.mlp, ex.sorted_loader, note="labels sorted, shuffle=False"),)
    valid = (Example(ex.mlp, ex.shuffled_loader, note="the same data shuffled"),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        order = probe.order_targets
        if order is not None and len(np.unique(order)) > 1 and np.all(np.diff(order) >= 0):
            yield self.finding(None, f"the loader does not shuffle and its labels come sorted ({len(np.unique(order))} "
                               f"classes in order over the first {len(order)} samples): every batch holds one or two classes",
                               {"shuffled": False, "samples_checked": len(order), "classes": len(np.unique(order))})
            return
        batches = probe.targets
        if not batches or len(batches) < 2:
            return
        labels = np.concatenate(batches)
        if len(np.unique(labels)) < 2:
            if order is not None and len(np.unique(order)) > 1:
                yield self.finding(None, "every probed batch holds a single class while the data has several: the loader "
                                   "serves grouped labels", {"classes_seen": len(np.unique(order))})
            return
        purity = float(np.mean([_purity(b) for b in batches]))
        rng = np.random.default_rng(0)
        sizes = np.cumsum([len(b) for b in batches])[:-1]
        shuffled = float(np.mean([np.mean([_purity(b) for b in np.split(rng.permutation(labels), sizes)]) for _ in range(20)]))
        excess = purity - shuffled
        if excess > self.config["max_purity_excess"]:
            yield self.finding(None, f"batches are {_fmt(purity)} pure on average (share of their top class) against "
                               f"{_fmt(shuffled)} for the same labels shuffled", {
                                   "batch_purity": purity, "shuffled_purity": shuffled, "excess": excess,
                                   "batches": len(batches), "max_purity_excess": self.config["max_purity_excess"]})


def _purity(labels: np.ndarray) -> float:
    return float(np.bincount(labels - labels.min()).max() / len(labels)) if len(labels) else 0.0


@register
class PaddingInBnInput(Rule):
    """Padding reaches a BatchNorm: whole positions of zeros are averaged into its statistics.

    Padded sequences (or zero-filled masks) put positions whose every channel is exactly zero into the
    tensor a BatchNorm normalizes. They drag each channel's batch mean towards zero and shrink its variance in
    proportion to the padding, so the statistics depend on how much padding a batch happens to hold, and the
    running statistics match neither real tokens nor padding. Normalize real positions only (a masked
    normalization), or use LayerNorm, which normalizes each position on its own.

    Measured: at each BatchNorm input, the fraction of positions (sample x spatial/sequence index) whose whole
    channel vector is exactly zero, over the probe batches. ReLU zeros scattered over channels do not count.
    Padding is a property of each sample, and positions of one sample are not independent, so the fraction
    is estimated from the per-sample fractions of the n probe samples, and the rule fires only when their
    one-sided 95% lower confidence bound (mean - t(0.95, n - 1) * sd / sqrt(n); ``zero_positions_lower``)
    exceeds ``max_zero_positions``: a fraction measured at 0.101 on 4 samples of a model whose true
    fraction is 0.09 is noise, not padding. With fewer than 2 samples nothing can be bounded and nothing is
    reported. All-zero positions need not be padding: a BatchNorm after a 1x1 convolution over a handful of
    ReLU channels sees one wherever all of them are zero (a ResNet bottleneck of width 4: about 9%).

    Options:
        ```yaml
        max_zero_positions: 0.1   # fraction of all-zero positions tolerated
        ```

    Bad:
        h = self.bn(self.emb(padded_tokens).transpose(1, 2))   # padding_idx rows are all zero
    Good:
        h = self.ln(self.emb(padded_tokens))                   # LayerNorm per token, or a masked BatchNorm
    """

    code = "BN205"
    name = "padding-in-bn-input"
    severity = "warning"
    summary = "a large share of all-zero positions (padding) enters a BatchNorm"
    fix = "exclude padded positions from the statistics (masked normalization) or use LayerNorm over the channels"
    family = "data"
    requires = frozenset({"data"})
    options = {"max_zero_positions": float}
    defaults = {"max_zero_positions": 0.1}
    invalid = (Example(ex.PaddedSeq, ex.padded_tokens, layer="bn", note="2-4 real tokens of 12"),)
    valid = (Example(ex.PaddedSeq, lambda: ex.padded_tokens(pad=False), note="no padding"),
             Example(lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 2)),
                     ex.standardized, note="BatchNorm after ReLU: zeros, but not whole positions"))

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        limit = self.config["max_zero_positions"]
        for name, frac in probe.zero_positions.items():
            per_sample = probe.zero_samples.get(name, np.zeros(0))
            n = len(per_sample)
            if frac <= limit or n < 2:
                continue
            # a t bound with the sample as the unit: positions of one sample share its padding, not independent
            lower = float(per_sample.mean() - _t_quantile(0.95, n - 1) * per_sample.std(ddof=1) / math.sqrt(n))
            if lower > limit:
                zf = probe.history.series(name, "zero_frac") if name in probe.history.info else np.array([np.nan])
                yield self.finding(name, f"{_fmt(100 * frac)}% of the positions entering {name} are all-zero vectors "
                                   f"(padding; at least {_fmt(100 * lower)}% at 95% confidence from {n} samples): "
                                   "they bias its batch statistics",
                                   {"zero_positions": frac, "zero_positions_lower": lower, "samples": n,
                                    "zero_values": float(np.nanmean(zf)), "max_zero_positions": limit})


@register
class ActivationDrift(Rule):
    """Layer activations drift during training (internal covariate shift), measured on a recorded run.

    Ioffe & Szegedy (2015) motivate BatchNorm with the change of each layer's input distribution as the
    layers before it learn. A layer whose inputs move by several standard deviations over training keeps
    chasing a moving target; normalization (or a lower learning rate, or warm-up) steadies it.

    Measured on ``ctx.history`` (``bnaudit.record`` around the training loop; ``bnaudit.inspect(...,
    history=rec.history)``): per recorded layer, per channel, the shift of the mean between the first and
    last fifth of the recorded steps in units of the early standard deviation, averaged over channels
    (``bnaudit.recording.measures.drift``). Normalization layers' outputs are not recorded; their inputs
    are. The model's output layers (``RuleContext.output_layers``: its logits, also through a final softmax
    or reshape) are passed over: a classifier's outputs move as it learns, and normalizing them is no fix.

    Options:
        ```yaml
        max_shift: 1.0   # mean shift, in early standard deviations
        window: 0        # steps per window; 0 = a fifth of the run
        top: 5           # report at most this many layers (the worst)
        ```

    Bad:
        a deep sigmoid MLP trained at lr=5 without normalization: its pre-activations wander by many stds
    Good:
        the same net with BatchNorm1d before each sigmoid, or at a learning rate that keeps drift small
    """

    code = "BN206"
    name = "activation-drift"
    severity = "warning"
    summary = "layer activation distributions drift strongly over training"
    fix = "normalize the drifting layers' inputs (`bnaudit insert-bn`), or lower the learning rate / add warm-up"
    family = "data"
    requires = frozenset({"history"})
    options = {"max_shift": float, "window": int, "top": int}
    defaults = {"max_shift": 1.0, "window": 0, "top": 5}
    invalid = (Example(ex.digits_mlp, context=lambda: ex.history(lr=5.0), note="sigmoid MLP at lr 5"),)
    valid = (Example(ex.digits_mlp, context=lambda: ex.history(lr=0.0), note="the same run at lr 0: nothing moves"),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        h = ctx.history
        if h is None or not len(h):
            return
        window = self.config["window"] or None
        drifts = [d for d in drift_all(h, window=window).values()
                  if np.isfinite(d.shift) and d.layer not in ctx.output_layers]
        bad = sorted((d for d in drifts if d.shift > self.config["max_shift"]), key=lambda d: -d.shift)
        for d in bad[: self.config["top"]]:
            yield self.finding(d.layer, f"{d.layer}'s activations drifted by {_fmt(d.shift)} stds (mean over channels; "
                               f"worst channel {_fmt(d.max_shift)}) between steps {d.first[0]}-{d.first[1]} and "
                               f"{d.last[0]}-{d.last[1]}; scale changed {_fmt(d.scale_ratio)}x",
                               {"shift": d.shift, "max_shift_channel": d.max_shift, "w2": d.w2, "scale_ratio": d.scale_ratio,
                                "first_window": list(d.first), "last_window": list(d.last),
                                "max_shift": self.config["max_shift"], "layers_over": len(bad)})


@register
class VanishingOrExploding(Rule):
    """Activation scale shrinks or grows geometrically with depth.

    Without normalization the second moment of the signal is multiplied at every layer by roughly
    ``gain^2 * fan_in * Var(w)``; away from 1 the signal vanishes or explodes exponentially with depth and so
    do the gradients (Glorot & Bengio 2010; He et al. 2015). PyTorch's default Linear/Conv initialisation
    shrinks it about threefold per ReLU layer. BatchNorm resets the scale at every layer.

    Measured on the probe batches: the second moment (mean^2 + variance) of each Linear/Conv output in
    execution order. Fires when there are at least ``min_layers`` such layers, the last one's second moment is
    below ``1 / max_ratio`` or above ``max_ratio`` times the first one's, and the per-layer geometric trend
    (``bnaudit.recording.measures.depth_trend``) agrees.

    Options:
        ```yaml
        max_ratio: 1000.0   # last / first second moment (or first / last)
        min_layers: 4       # weight layers needed to speak of depth
        ```

    Bad:
        nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(10)])  # small init
    Good:
        the same with nn.BatchNorm1d(32) after each Linear, or a gain-correct init (kaiming_normal_)
    """

    code = "BN207"
    name = "vanishing-or-exploding"
    severity = "warning"
    summary = "activation scale shrinks or grows geometrically with depth"
    fix = "insert BatchNorm after the weight layers (`bnaudit insert-bn`) or use a variance-preserving init (kaiming/xavier)"
    family = "data"
    requires = frozenset({"data"})
    options = {"max_ratio": float, "min_layers": int}
    defaults = {"max_ratio": 1000.0, "min_layers": 4}
    invalid = (
        Example(lambda: ex.deep(nn.Tanh, 0.3), ex.wide_x, note="tanh, weights at 0.3 x the preserving scale: vanishes"),
        Example(lambda: ex.deep(nn.Identity, 3.0), ex.wide_x, note="linear layers at 3 x the scale: explodes"),
    )
    valid = (
        Example(lambda: ex.deep(nn.Tanh, 0.3, bn=True), ex.wide_x, note="the same with BatchNorm"),
        Example(lambda: ex.deep(nn.ReLU, 2**0.5), ex.wide_x, note="kaiming-scaled ReLU layers"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        h = probe.history
        named = dict(ctx.model.named_modules())
        layers = [n for n in h.layers if n in named and is_weight_layer(named[n])]
        if len(layers) < self.config["min_layers"]:
            return
        second = []
        for n in layers:
            mean = h.series(n, "mean")
            var = h.series(n, "var")
            ok = np.isfinite(mean) & np.isfinite(var)
            second.append(float(np.mean(mean[ok] ** 2 + var[ok])) if ok.any() else float("nan"))
        s = np.asarray(second)
        if not np.isfinite(s[[0, -1]]).all() or s[0] <= 0:
            return
        limit = self.config["max_ratio"]
        # Compare the first weight layer with the smallest (largest) second moment after it, not with the last
        # layer: an output layer's bias alone can hold the final scale up.
        lo, hi = int(np.nanargmin(s)), int(np.nanargmax(s))
        for kind, k in (("vanishes", lo), ("explodes", hi)):
            ratio = float(s[k] / s[0]) if s[k] > 0 else 0.0
            trend = depth_trend(s[: k + 1])
            if kind == "vanishes" and not (ratio < 1 / limit and (not np.isfinite(trend) or trend < 1)):
                continue
            if kind == "explodes" and not (ratio > limit and (not np.isfinite(trend) or trend > 1)):
                continue
            ev = {"first_layer": layers[0], "worst_layer": layers[k], "first_second_moment": float(s[0]),
                  "worst_second_moment": float(s[k]), "ratio": ratio, "per_layer_factor": trend,
                  "weight_layers": len(layers), "max_ratio": limit, "second_moments": [float(v) for v in s]}
            factor = 1 / max(ratio, 1e-300) if kind == "vanishes" else ratio
            verb = "falls" if kind == "vanishes" else "grows"
            yield self.finding(layers[k], f"the signal {kind} with depth: its second moment {verb} {_fmt(factor)}x from "
                               f"{layers[0]} to {layers[k]} (x{_fmt(trend)} per weight layer)", ev)
            return


@register
class DeadOrSaturated(Rule):
    """Units that never activate (dead ReLUs) or that sit in a sigmoid/tanh's flat tails.

    A ReLU unit whose input is negative for every sample passes no gradient and never recovers; a sigmoid or
    tanh whose inputs sit beyond a few units from zero has a near-zero slope, so the layers below it stop
    learning (Ioffe & Szegedy 2015 motivate BatchNorm with exactly this saturation). Both come from
    pre-activations that are badly scaled or shifted, which BatchNorm before the activation prevents.

    Measured on the probe batches: per ReLU/ReLU6 module the fraction of units (channels) never positive on
    any probe sample; per Sigmoid/Tanh/Hardtanh/Hardsigmoid module the fraction of its input values beyond
    the flat-tail threshold (|x| > 5 for sigmoid, 3 for tanh, where the slope is under 1% of its maximum).

    Options:
        ```yaml
        max_dead: 0.5        # fraction of dead units
        max_saturated: 0.5   # fraction of saturated inputs
        ```

    Bad:
        nn.Sequential(nn.Linear(4, 16), nn.Sigmoid())    # weights 100x too large: sigmoid inputs at +-50
    Good:
        nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Sigmoid())
    """

    code = "BN208"
    name = "dead-or-saturated"
    severity = "warning"
    summary = "many ReLU units never activate, or sigmoid/tanh inputs sit in the flat tails"
    fix = "insert BatchNorm before the activation (`bnaudit insert-bn`), fix the init scale, or lower the learning rate"
    family = "data"
    requires = frozenset({"data"})
    options = {"max_dead": float, "max_saturated": float}
    defaults = {"max_dead": 0.5, "max_saturated": 0.5}
    invalid = (
        Example(ex.dead_relu, ex.standardized, layer="1", note="ReLU after a bias of -100"),
        Example(ex.saturated_sigmoid, ex.standardized, layer="1", note="sigmoid after weights x100"),
    )
    valid = (Example(ex.mlp_bn, ex.standardized, note="BatchNorm before ReLU"),
             Example(ex.healthy_sigmoid, ex.standardized, note="default init before a sigmoid"))

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        probe = data_probe(ctx)
        for name, (dead, units) in sorted(probe.dead.items()):
            frac = dead / units if units else 0.0
            if frac > self.config["max_dead"]:
                yield self.finding(name, f"{dead} of {units} units of {name} never activate on the probe batches (dead ReLUs)",
                                   {"dead_units": dead, "units": units, "dead_fraction": frac, "max_dead": self.config["max_dead"]})
        for name, (frac, limit) in sorted(probe.saturated.items()):
            if frac > self.config["max_saturated"]:
                yield self.finding(name, f"{_fmt(100 * frac)}% of {name}'s inputs are beyond |x| > {_fmt(limit)}, where its "
                                   "slope is under 1% of its maximum (saturated)",
                                   {"saturated_fraction": frac, "threshold": limit, "max_saturated": self.config["max_saturated"]})


@register
class NonFinite(Rule):
    """NaN or Inf in activations or in BatchNorm buffers.

    One NaN in a running mean or variance poisons every eval-mode prediction of the channels it touches; an
    Inf activation turns into NaN gradients at the next step. Both are silent until the loss becomes NaN.
    Typical causes: a division by a zero variance, a learning rate that blew up, fp16 overflow, a corrupt
    checkpoint, NaN in the data.

    Checked: every BatchNorm's running_mean/running_var in the audited model (no data needed beyond the
    probe), the probe's inputs, and every recorded activation on the probe batches; the finding names the first
    layer (in execution order) where non-finite values appear.

    Options: none.

    Bad:
        model.load_state_dict(ckpt)     # a checkpoint saved after the loss went NaN
    Good:
        torch.isfinite(p).all() for every parameter and buffer before saving
    """

    code = "BN209"
    name = "non-finite"
    severity = "error"
    summary = "NaN or Inf in activations or BatchNorm buffers"
    fix = ("find where it starts (the layer named here): check the data for NaN, lower the learning rate, use "
           "gradient clipping or fp32; `bnaudit recalibrate` rebuilds broken running statistics")
    family = "data"
    requires = frozenset({"data"})
    invalid = (
        Example(ex.nan_buffer, ex.standardized, layer="1", note="a NaN in running_var"),
        Example(ex.inf_weight, ex.standardized, layer="0", note="an Inf weight"),
    )
    valid = (Example(ex.mlp_bn, ex.standardized, note="finite everywhere"),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        for name, m in ctx.model.named_modules():
            if not name or not is_batchnorm(m):
                continue
            for buf in ("running_mean", "running_var"):
                t = getattr(m, buf, None)
                if isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
                    bad = int((~torch.isfinite(t)).sum())
                    yield self.finding(name, f"{name}.{buf} holds {bad} non-finite value(s) of {t.numel()}",
                                       {"buffer": buf, "nonfinite": bad, "channels": int(t.numel())})
        probe = data_probe(ctx)
        if probe.input is not None and probe.input["nonfinite_frac"] > 0:
            yield self.finding(None, f"the input data holds NaN/Inf ({_fmt(100 * probe.input['nonfinite_frac'])}% of values)",
                               {"input_nonfinite_fraction": probe.input["nonfinite_frac"]})
        h = probe.history
        for name in h.layers:
            frac = h.series(name, "nonfinite_frac")
            if np.nanmax(frac, initial=0.0) > 0:
                yield self.finding(name, f"non-finite activations first appear at {name} ({_fmt(100 * float(np.nanmax(frac)))}% "
                                   "of its values in the worst batch)", {"nonfinite_fraction": float(np.nanmax(frac)),
                                                                          "type": h.info[name]["type"]})
                break
