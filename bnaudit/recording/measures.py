"""Derived measures over a recorded History: the numbers the data rules and train-compare report.

Public API (stable)::

    drift(history, layer, *, window=None) -> Drift          # first vs last window of steps
    drift_all(history, *, window=None) -> dict[str, Drift]
    percentiles(history, layer, unit=0, *, levels=None) -> (steps, levels) array   # Ioffe & Szegedy Fig. 1
    signal_propagation(history, *, window=None) -> list[DepthStat]                 # mean^2 and var by depth
    depth_trend(values) -> float                           # geometric factor per layer (1 = flat)
    dead_fraction(history, layer, *, window=None) -> float  # ReLU-like units zero on every step
    saturated_fraction(history, layer, *, kind, margin=0.05, window=None) -> float
    batch_stats_from_buffers(old_mean, old_var, new_mean, new_var, *, momentum, num_batches_tracked, n)
    bn_batch_stats(history, layer, *, n=None) -> (mean, var)   # each step's batch stats from running buffers

Drift is measured per channel between the first and the last ``window`` recorded steps (default: a fifth of
the run, at least one step): ``shift`` is the mean over channels of ``|mu_last - mu_first| / sigma_first``
(the internal covariate shift in units of the early standard deviation), ``w2`` the 2-Wasserstein distance
between the two windows' Gaussian summaries in the same units, ``scale_ratio`` ``sigma_last / sigma_first``.
A window pools its steps: its variance is the mean within-step variance plus the variance of the step means.

``batch_stats_from_buffers`` inverts BatchNorm's update ``new = (1 - m) old + m batch`` (``m = momentum``,
or ``1 / num_batches_tracked`` for ``momentum=None``, the cumulative average); ``running_var`` receives the
*unbiased* batch variance, so the biased one is ``unbiased * (n - 1) / n`` with ``n`` values per channel."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bnaudit.errors import UsageError

if TYPE_CHECKING:
    from bnaudit.recording.history import History

__all__ = [
    "DepthStat", "Drift", "batch_stats_from_buffers", "bn_batch_stats", "dead_fraction", "depth_trend", "drift",
    "drift_all", "percentiles", "saturated_fraction", "signal_propagation",
]

_Z = {0.15: -1.0364333894937898, 0.5: 0.0, 0.85: 1.0364333894937898}


@dataclass(frozen=True)
class Drift:
    """How far a layer's activation distribution moved between the first and last windows of steps.

    Attributes:
        layer: the layer.
        shift: mean over channels of ``|mu_last - mu_first| / sigma_first``.
        max_shift: the largest channel's shift.
        w2: mean over channels of the 2-Wasserstein distance between the windows' Gaussians, over sigma_first.
        scale_ratio: median over channels of ``sigma_last / sigma_first``.
        first: the recorded step numbers of the first window (first, last).
        last: those of the last window.
    """

    layer: str
    shift: float
    max_shift: float
    w2: float
    scale_ratio: float
    first: tuple[int, int]
    last: tuple[int, int]


@dataclass(frozen=True)
class DepthStat:
    """Signal propagation at one recorded layer: its depth (execution order) and moments."""

    layer: str
    depth: int
    type: str
    mean_sq: float
    var: float

    @property
    def second_moment(self) -> float:
        return self.mean_sq + self.var


def _window(n: int, window: int | None) -> int:
    if n == 0:
        raise UsageError("the history is empty: record at least one step (rec.step()) first")
    w = max(1, n // 5) if window is None else int(window)
    if w < 1:
        raise UsageError(f"window must be at least 1 step, got {window}")
    return min(w, n)


def _pooled(cm: np.ndarray, cv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per channel of several steps pooled (equal counts per step)."""
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(cm, axis=0)
        var = np.nanmean(cv, axis=0) + np.nanvar(cm, axis=0)
    return mean, var


def drift(history: History, layer: str, *, window: int | None = None) -> Drift:
    """Drift of one layer's per-channel distribution between the first and last ``window`` steps.

    Args:
        history: a recorded History.
        layer: a recorded layer.
        window: steps per window (default: a fifth of the recorded steps, at least 1).

    Returns:
        A Drift (zeros when only one step was recorded).

    Raises:
        UsageError: an empty history, an unknown layer, or a window below 1.
    """
    cm = history.series(layer, "channel_mean")
    cv = history.series(layer, "channel_var")
    keep = ~np.all(np.isnan(cm), axis=1) if cm.size else np.zeros(0, bool)
    steps = history.steps[keep]
    cm, cv = cm[keep], cv[keep]
    w = _window(len(cm), window)
    m0, v0 = _pooled(cm[:w], cv[:w])
    m1, v1 = _pooled(cm[-w:], cv[-w:])
    s0, s1 = np.sqrt(v0), np.sqrt(v1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A channel constant in the first window (a dead unit) has no scale: measure it against the layer's.
        floor = max(float(np.nanmedian(s0)) if s0.size else 0.0, 1e-12)
        s0s = np.where(s0 > 1e-12, s0, floor)
        shift = np.abs(m1 - m0) / s0s
        w2 = np.sqrt((m1 - m0) ** 2 + (s1 - s0) ** 2) / s0s
        ratio = s1 / s0s
    return Drift(
        layer=layer,
        shift=_nanmean(shift),
        max_shift=float(np.nanmax(shift)) if np.isfinite(shift).any() else float("nan"),
        w2=_nanmean(w2),
        scale_ratio=float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else float("nan"),
        first=(int(steps[0]), int(steps[w - 1])),
        last=(int(steps[-w]), int(steps[-1])),
    )


def _nanmean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def drift_all(history: History, *, window: int | None = None) -> dict[str, Drift]:
    """``drift`` for every recorded layer that was called in at least one step."""
    out = {}
    for layer in history.layers:
        if np.nansum(history.series(layer, "calls")) > 0:
            out[layer] = drift(history, layer, window=window)
    return out


def percentiles(history: History, layer: str, unit: int = 0, *, levels: tuple[float, ...] | None = None) -> np.ndarray:
    """Percentiles of one unit's values at each recorded step (Ioffe & Szegedy 2015, Fig. 1: the 15th, 50th
    and 85th percentiles of a sigmoid's input over training).

    Exact when ``record(units={layer: [unit]})`` watched the unit; otherwise a Gaussian approximation from
    the unit's recorded mean and standard deviation (``mean + z_q * std``), which is only as good as the
    normality of that unit's values.

    Args:
        history: a recorded History.
        layer: a recorded layer (for a sigmoid's input, the Linear layer feeding it).
        unit: the channel index.
        levels: quantile levels (default: the recorded ones, else 0.15, 0.5, 0.85).

    Returns:
        ``(steps, len(levels))`` float64 array.

    Raises:
        UsageError: unknown layer, unit out of range, or levels the recording did not keep.
    """
    info = history.info.get(layer)
    if info is None:
        history.series(layer, "calls")  # raises the standard unknown-layer error
    watched = list(info.get("units") or ())
    if unit in watched:
        rec_levels = tuple(history.quantile_levels)
        want = rec_levels if levels is None else tuple(levels)
        missing = [q for q in want if not any(math.isclose(q, r) for r in rec_levels)]
        if missing:
            raise UsageError(f"levels {missing} were not recorded for {layer!r} (recorded: {list(rec_levels)})")
        q = history.series(layer, "quantiles")[:, :, watched.index(unit)]
        cols = [next(i for i, r in enumerate(rec_levels) if math.isclose(r, w)) for w in want]
        return q[:, cols]
    want = (0.15, 0.5, 0.85) if levels is None else tuple(levels)
    cm = history.series(layer, "channel_mean")
    if unit < 0 or unit >= cm.shape[1]:
        raise UsageError(f"unit {unit} is out of range for {layer!r} ({cm.shape[1]} channels)")
    sd = history.series(layer, "channel_std")[:, unit]
    z = np.array([_Z.get(q, _probit(q)) for q in want])
    return cm[:, unit, None] + sd[:, None] * z[None, :]


def _probit(q: float) -> float:
    # Inverse normal CDF by bisection on erf: exact enough for plotting levels, no scipy needed.
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def signal_propagation(history: History, *, window: int | None = None, types: tuple[str, ...] | None = None) -> list[DepthStat]:
    """Mean squared and variance of each recorded layer, in execution order, over the last ``window``
    recorded steps (default: all of them).

    Args:
        history: a recorded History.
        window: how many of the last steps to pool.
        types: keep only layers of these module types (e.g. ``("Linear", "Conv2d")``).

    Returns:
        One DepthStat per layer; ``depth`` counts the kept layers from 0.
    """
    out = []
    depth = 0
    n = len(history)
    if n == 0:
        raise UsageError("the history is empty: record at least one step (rec.step()) first")
    w = n if window is None else _window(n, window)
    for layer in history.layers:
        kind = history.info[layer]["type"]
        if types is not None and kind not in types:
            continue
        mean = history.series(layer, "mean")[-w:]
        var = history.series(layer, "var")[-w:]
        ok = np.isfinite(mean) & np.isfinite(var)
        if not ok.any():
            continue
        out.append(DepthStat(layer, depth, kind, float(np.mean(mean[ok] ** 2)), float(np.mean(var[ok]))))
        depth += 1
    return out


def depth_trend(values: list[float] | np.ndarray) -> float:
    """The geometric factor per layer of a positive series over depth: ``exp(slope)`` of a least-squares line
    through ``log(values)``; 1 means flat, 0.5 halving per layer, 2 doubling. NaN with fewer than 3 points."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) < 3:
        return float("nan")
    x = np.arange(len(v), dtype=np.float64)
    slope = np.polyfit(x, np.log(v), 1)[0]
    return float(math.exp(slope))


def _rows(history: History, layer: str, stat: str, window: int | None) -> np.ndarray:
    a = history.series(layer, stat)
    a = a[~np.all(np.isnan(a), axis=1)] if a.ndim == 2 else a
    if not len(a):
        raise UsageError(f"layer {layer!r} was never called in the recorded steps")
    return a if window is None else a[-_window(len(a), window):]


def dead_fraction(history: History, layer: str, *, window: int | None = None) -> float:
    """Fraction of channels of a ReLU-like output that are exactly zero in every recorded step of the window
    (channel mean and variance both zero: for non-negative outputs, that means every value was zero)."""
    cm = _rows(history, layer, "channel_mean", window)
    cv = _rows(history, layer, "channel_var", window)
    dead = np.all((cm == 0) & (cv == 0), axis=0)
    return float(dead.mean()) if dead.size else 0.0


def saturated_fraction(history: History, layer: str, *, kind: str, margin: float = 0.05, window: int | None = None) -> float:
    """Fraction of channels of a sigmoid or tanh *output* sitting at an asymptote in every recorded step of the
    window: mean within ``margin`` of the bound (0/1 for sigmoid, -1/1 for tanh) and std below ``margin``.

    Raises:
        UsageError: ``kind`` is neither ``sigmoid`` nor ``tanh``.
    """
    if kind not in ("sigmoid", "tanh"):
        raise UsageError(f"kind must be 'sigmoid' or 'tanh', got {kind!r}")
    cm = _rows(history, layer, "channel_mean", window)
    sd = _rows(history, layer, "channel_std", window)
    lo, hi = (0.0, 1.0) if kind == "sigmoid" else (-1.0, 1.0)
    span = hi - lo
    near = ((cm - lo) < margin * span) | ((hi - cm) < margin * span)
    sat = np.all(near & (sd < margin * span), axis=0)
    return float(sat.mean()) if sat.size else 0.0


def batch_stats_from_buffers(
    old_mean: np.ndarray, old_var: np.ndarray, new_mean: np.ndarray, new_var: np.ndarray, *,
    momentum: float | None, num_batches_tracked: int, n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Recover the batch mean and (biased) variance a train-mode BatchNorm used, from its running buffers
    before and after one forward pass: no hook needed.

    Args:
        old_mean, old_var: running_mean / running_var before the pass.
        new_mean, new_var: after it.
        momentum: the layer's momentum (None: cumulative average).
        num_batches_tracked: the counter *after* the pass (used when momentum is None).
        n: values per channel in the batch (N, N*L or N*H*W).

    Returns:
        ``(batch_mean, batch_var)``, float64.

    Raises:
        UsageError: momentum 0 (the buffers never move) or n < 2.
    """
    m = (1.0 / num_batches_tracked if num_batches_tracked > 0 else 0.0) if momentum is None else float(momentum)
    if m <= 0:
        raise UsageError("momentum 0 leaves the running buffers unchanged; the batch statistics cannot be recovered")
    if n < 2:
        raise UsageError(f"need at least 2 values per channel to undo the unbiased variance, got {n}")
    old_mean, old_var = np.asarray(old_mean, np.float64), np.asarray(old_var, np.float64)
    new_mean, new_var = np.asarray(new_mean, np.float64), np.asarray(new_var, np.float64)
    mean = (new_mean - (1 - m) * old_mean) / m
    unbiased = (new_var - (1 - m) * old_var) / m
    return mean, unbiased * (n - 1) / n


def bn_batch_stats(history: History, layer: str, *, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each recorded step's batch mean and biased variance of a BatchNorm layer, recovered from its running
    buffers alone (``batch_stats_from_buffers`` between consecutive recorded steps, the first against the
    buffers at ``record`` entry). Exact to float32 rounding when every step ran one train-mode forward pass of
    the layer and every step was recorded (``every=1``); steps where the layer did not update are NaN.

    Args:
        history: a recorded History.
        layer: a BatchNorm layer of the recorded model.
        n: values per channel per batch; default: the ``count`` recorded for the layer.

    Returns:
        ``(mean, var)``, each ``(steps, C)``.

    Raises:
        UsageError: not a BatchNorm layer with running statistics, or ``n`` unknown.
    """
    info = history.bn_info.get(layer)
    if info is None or not info.get("channels"):
        raise UsageError(f"{layer!r} is not a BatchNorm layer with running statistics in this history")
    if not info.get("buffers_recorded", True):
        raise UsageError(f"{layer!r}'s running buffers were not recorded (per_channel=False); record with per_channel=True")
    rm = history.series(layer, "running_mean")
    rv = history.series(layer, "running_var")
    nbt = history.series(layer, "num_batches_tracked")
    if n is None:
        if layer not in history.info:
            raise UsageError(f"pass n= (values per channel): {layer!r}'s input was not recorded")
        counts = history.series(layer, "count")
    else:
        counts = np.full(len(rm), float(n))
    prev_m, prev_v = info["initial_mean"], info["initial_var"]
    prev_t = info["initial_num_batches_tracked"]
    means = np.full(rm.shape, np.nan)
    vars_ = np.full(rm.shape, np.nan)
    for i in range(len(rm)):
        t = int(nbt[i])
        if t == prev_t + 1 and counts[i] >= 2:
            means[i], vars_[i] = batch_stats_from_buffers(prev_m, prev_v, rm[i], rv[i], momentum=info["momentum"],
                                                          num_batches_tracked=t, n=int(counts[i]))
        prev_m, prev_v, prev_t = rm[i], rv[i], t
    return means, vars_
