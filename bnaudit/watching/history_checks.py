"""The checks ``bnaudit watch`` makes on a model's recorded history when the script ends: BN206 (drift, the
rule itself), BN207 (scale vanishing or exploding with depth), BN208 (dead or saturated units), BN209 (the
first step and layer where a NaN/Inf appears) and BN203 (batch-statistic noise). Each uses its registered
rule's code, options and fix; the numbers come from ``bnaudit.recording.measures`` over the recorded steps
(the last fifth of them, where a window is needed) instead of the rules' probe batches."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from statistics import NormalDist
from typing import Any

import numpy as np
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.findings import Finding
from bnaudit.layers import is_weight_layer
from bnaudit.recording import History
from bnaudit.recording.measures import dead_fraction, depth_trend, saturated_fraction

__all__ = ["history_findings"]

_RELU = ("ReLU", "ReLU6")
_SATURATING = {"Sigmoid": "sigmoid", "Tanh": "tanh"}


def _fifth(history: History) -> int:
    return max(1, len(history) // 5)


def _bn206(rule: Any, model: nn.Module, history: History, where: Callable[[int], str | None],
           outputs: Collection[str] = ()) -> list[Finding]:
    """The drift rule itself, passing over the model's output layers: a classifier's logits growing more
    confident as it learns is the training working, and normalizing them is no fix."""
    import torch

    ctx = RuleContext(model=model, graph=None, device=torch.device("cpu"), history=history,  # type: ignore[arg-type]
                      output_layers=frozenset(outputs))
    return list(rule.check(ctx))


def _bn209(rule: Any, model: nn.Module, history: History, where: Callable[[int], str | None]) -> list[Finding]:
    steps = history.steps
    first: tuple[int, int, str, str, float] | None = None  # (row, order, layer, kind, fraction)
    for order, layer in enumerate(history.layers):
        frac = np.nan_to_num(history.series(layer, "nonfinite_frac"), nan=0.0)
        hit = np.flatnonzero(frac > 0)
        if hit.size and (first is None or hit[0] < first[0]):
            first = (int(hit[0]), order, layer, "activations", float(frac[hit[0]]))
    for layer in history.bn_layers:
        if not history.bn_info[layer].get("buffers_recorded"):
            continue
        for buf in ("running_mean", "running_var"):
            vals = history.series(layer, buf)
            bad = ~np.isfinite(vals).all(axis=1) & ~np.isnan(vals).all(axis=1)
            hit = np.flatnonzero(bad)
            if hit.size and (first is None or hit[0] < first[0]):
                first = (int(hit[0]), len(history.layers), layer, buf, float((~np.isfinite(vals[hit[0]])).mean()))
    if first is None:
        return []
    row, _, layer, kind, frac = first
    step = int(steps[row])
    what = "non-finite activations" if kind == "activations" else f"a non-finite {kind}"
    f = rule.finding(layer, f"{what} first appear at step {step} in {layer} ({100 * frac:.3g}% of its "
                     f"{'values' if kind == 'activations' else 'channels'}): the earliest layer, in execution "
                     "order, where NaN/Inf shows up", {"step": step, "where": kind, "nonfinite_fraction": frac,
                                                       "type": history.info.get(layer, {}).get("type")})
    return [replace(f, step=step, location=where(step))]


def _bn207(rule: Any, model: nn.Module, history: History, where: Callable[[int], str | None]) -> list[Finding]:
    named = dict(model.named_modules())
    w = _fifth(history)
    layers, second = [], []
    for layer in history.layers:
        if layer not in named or not is_weight_layer(named[layer]):
            continue
        mean, var = history.series(layer, "mean")[-w:], history.series(layer, "var")[-w:]
        ok = np.isfinite(mean) & np.isfinite(var)
        if ok.any():
            layers.append(layer)
            second.append(float(np.mean(mean[ok] ** 2 + var[ok])))
    if len(layers) < rule.config["min_layers"] or second[0] <= 0:
        return []
    s, limit = np.asarray(second), rule.config["max_ratio"]
    for kind, k in (("vanishes", int(np.argmin(s))), ("explodes", int(np.argmax(s)))):
        ratio = float(s[k] / s[0])
        trend = depth_trend(s[: k + 1])
        ok_trend = not np.isfinite(trend) or (trend < 1 if kind == "vanishes" else trend > 1)
        if not ok_trend or not (ratio < 1 / limit if kind == "vanishes" else ratio > limit):
            continue
        factor = 1 / max(ratio, 1e-300) if kind == "vanishes" else ratio
        return [rule.finding(layers[k], f"the signal {kind} with depth over the last {w} recorded steps: its second "
                             f"moment changes {factor:.4g}x from {layers[0]} to {layers[k]} (x{trend:.3g} per weight "
                             "layer)", {"first_layer": layers[0], "worst_layer": layers[k], "ratio": ratio,
                                        "per_layer_factor": trend, "max_ratio": limit, "window": w,
                                        "second_moments": [float(v) for v in s]})]
    return []


def _bn208(rule: Any, model: nn.Module, history: History, where: Callable[[int], str | None]) -> list[Finding]:
    out, w = [], _fifth(history)
    for layer in history.layers:
        kind = history.info[layer]["type"]
        if history.info[layer].get("channel_dim") is None or not np.nansum(history.series(layer, "calls")):
            continue
        if kind in _RELU:
            frac = dead_fraction(history, layer, window=w)
            if frac > rule.config["max_dead"]:
                out.append(rule.finding(layer, f"{100 * frac:.3g}% of {layer}'s units were zero on every sample of the "
                                        f"last {w} recorded steps (dead ReLUs)",
                                        {"dead_fraction": frac, "window": w, "max_dead": rule.config["max_dead"]}))
        elif kind in _SATURATING:
            frac = saturated_fraction(history, layer, kind=_SATURATING[kind], window=w)
            if frac > rule.config["max_saturated"]:
                out.append(rule.finding(layer, f"{100 * frac:.3g}% of {layer}'s units sat at an asymptote in every one "
                                        f"of the last {w} recorded steps (saturated)",
                                        {"saturated_units_fraction": frac, "window": w,
                                         "max_saturated": rule.config["max_saturated"]}))
    return out


def _lower_factor(n: int, confidence: float) -> float:
    """sqrt(n / chi2_q(confidence, n - 1)): a standard deviation from ``n`` values to its one-sided lower
    confidence bound (Wilson-Hilferty's chi-square quantile, as BN203 uses)."""
    k = n - 1
    z = NormalDist().inv_cdf(confidence)
    h = 2.0 / (9.0 * k)
    return math.sqrt(n / (k * max(1.0 - h + z * math.sqrt(h), 1e-12) ** 3))


def _bn203(rule: Any, model: nn.Module, history: History, where: Callable[[int], str | None]) -> list[Finding]:
    """Batch-mean noise from consecutive steps: half the mean squared step-to-step change of each channel's
    batch mean (slow drift cancels in the difference) against the channel's variance."""
    out = []
    limit, confidence = rule.config["max_mean_noise"], rule.config["confidence"]
    for layer in history.bn_layers:
        if layer not in history.info or history.info[layer].get("channel_dim") is None:
            continue
        cm, cv = history.series(layer, "channel_mean"), history.series(layer, "channel_var")
        ok = np.isfinite(cm).all(axis=1) & np.isfinite(cv).all(axis=1)
        cm, cv = cm[ok], cv[ok]
        if len(cm) < max(3, rule.config["min_batches"]):
            continue
        var = cv.mean(axis=0)
        live = var > 1e-12
        if not live.any():
            continue
        noise = np.sqrt((np.diff(cm[:, live], axis=0) ** 2).mean(axis=0) / 2 / var[live])
        med = float(np.median(noise))
        lower = med * _lower_factor(len(cm) - 1, confidence)
        if lower > limit:
            counts = history.series(layer, "count")[ok]
            out.append(rule.finding(layer, f"{layer}'s batch means move by {med:.3g} standard deviations from step to "
                                    f"step (median over channels; at least {lower:.3g} at {100 * confidence:.3g}% "
                                    f"confidence) at {int(np.median(counts))} values per channel",
                                    {"mean_noise_median": med, "mean_noise_lower": lower, "confidence": confidence,
                                     "steps": len(cm), "values_per_channel": int(np.median(counts)),
                                     "max_mean_noise": limit}))
    return out


_CHECKS = {"BN203": _bn203, "BN206": _bn206, "BN207": _bn207, "BN208": _bn208, "BN209": _bn209}
CODES = tuple(_CHECKS)


def history_findings(model: nn.Module, history: History, rules: Mapping[str, Any],
                     where: Callable[[int], str | None], outputs: Collection[str] = ()
                     ) -> tuple[list[Finding], dict[str, str]]:
    """The end-of-run findings of the enabled ``rules`` (code -> instance) over ``history``; ``outputs``
    names the model's output layers, which the drift check (BN206) passes over.

    Returns:
        The findings and, per check that could not run, why (code -> reason).
    """
    out: list[Finding] = []
    skipped: dict[str, str] = {}
    if not len(history):
        return out, {code: "no step was recorded" for code in _CHECKS if code in rules}
    for code, check in _CHECKS.items():
        if code not in rules:
            continue
        try:
            with warnings.catch_warnings():  # all-NaN windows (a layer not called early on) are expected
                warnings.simplefilter("ignore", RuntimeWarning)
                if code == "BN206":
                    out += _bn206(rules[code], model, history, where, outputs)
                else:
                    out += check(rules[code], model, history, where)
        except Exception as exc:  # noqa: BLE001 - one check's failure must not hide the others' findings
            skipped[code] = f"internal error: {type(exc).__name__}: {exc}"
    return out, skipped
