"""The figures of a watched training run (``bnaudit watch``), one PNG each, drawn from a model's History:

- ``drift``: each of the most-drifting layers' mean activation over the recorded steps, in units of its
  early standard deviation (0 = where it started);
- ``percentiles``: the 15th/50th/85th percentiles of the most-drifting layer's most-drifting unit (Ioffe &
  Szegedy 2015, Fig. 1; a Gaussian view from the unit's mean and std unless the unit was watched);
- ``modes``: every BatchNorm layer's train/eval mode at every recorded step, with the optimizer steps;
- ``running``: one BatchNorm layer's running mean against the batch means it saw (channel average).

matplotlib (``pip install 'bnaudit[plot]'``) with the Agg backend; nothing is shown on screen."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from bnaudit.errors import UsageError

__all__ = ["watch_figures"]

FIGURES = ("drift", "percentiles", "modes", "running")


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError("plots need matplotlib: pip install 'bnaudit[plot]' (or pass --no-plots)") from exc
    return Figure


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _drifting(history: Any, top: int) -> list[Any]:
    from bnaudit.recording.measures import drift_all

    if len(history) < 2:
        return []
    drifts = [d for d in drift_all(history).values() if np.isfinite(d.shift)]
    return sorted(drifts, key=lambda d: -d.shift)[:top]


def _shift_series(history: Any, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Per recorded step, the layer's mean shift from its first fifth of steps in early standard deviations,
    averaged over channels: the measure BN206 compares between the first and last fifth, step by step."""
    cm, cv = history.series(layer, "channel_mean"), history.series(layer, "channel_var")
    ok = np.isfinite(cm).all(axis=1)
    cm, cv = cm[ok], cv[ok]
    w = max(1, len(cm) // 5)
    m0 = cm[:w].mean(axis=0)
    s0 = np.sqrt(cv[:w].mean(axis=0) + cm[:w].var(axis=0))
    floor = max(float(np.median(s0)) if s0.size else 0.0, 1e-12)
    s0 = np.where(s0 > 1e-12, s0, floor)
    return history.steps[ok], (np.abs(cm - m0) / s0).mean(axis=1)


def _drift(history: Any, title: str, Figure: Any) -> Any | None:
    top = [d for d in _drifting(history, 6) if history.info[d.layer].get("channel_dim") is not None]
    if not top:
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for d in top:
        steps, shift = _shift_series(history, d.layer)
        ax.plot(steps, shift, label=f"{d.layer} (BN206 shift {d.shift:.2g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean shift from the first steps (stds)")
    ax.set_title(f"{title}: the most drifting layers")
    ax.legend(fontsize=7)
    return fig


def _percentiles(history: Any, title: str, Figure: Any) -> Any | None:
    from bnaudit.recording.measures import percentiles

    top = _drifting(history, 1)
    if not top or history.info[top[0].layer].get("channel_dim") is None:
        return None
    layer = top[0].layer
    cm = history.series(layer, "channel_mean")
    ok = np.isfinite(cm).all(axis=1)
    if ok.sum() < 2:
        return None
    rows = cm[ok]
    w = max(1, len(rows) // 5)
    early_sd = np.nanmean(history.series(layer, "channel_std")[ok][:w], axis=0)
    early_sd = np.where(early_sd > 1e-12, early_sd, 1.0)
    unit = int(np.nanargmax(np.abs(rows[-w:].mean(0) - rows[:w].mean(0)) / early_sd))
    q = percentiles(history, layer, unit)
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    steps = history.steps
    for j, lab in enumerate(("15th", "50th", "85th")):
        ax.plot(steps[ok], q[ok, j], label=lab)
    ax.set_xlabel("optimizer step")
    watched = unit in (history.info[layer].get("units") or ())
    how = "" if watched else " (Gaussian view from its mean and std)"
    ax.set_title(f"{title}: {layer} unit {unit}, percentiles over training{how}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _modes(history: Any, title: str, Figure: Any, events: dict[str, list[int]]) -> Any | None:
    bns = history.bn_layers
    if not bns or not len(history):
        return None
    grid = np.stack([history.bn_modes(n).training.astype(float) for n in bns])
    fig = Figure(figsize=(7, 0.6 + 0.3 * len(bns) + 1))
    ax = fig.add_subplot()
    steps = history.steps
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdYlGn", vmin=0, vmax=1,
              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(bns) - 0.5, -0.5))
    ax.set_yticks(range(len(bns)), bns, fontsize=7)
    for code, marks in events.items():
        for s in marks:
            ax.axvline(s, color="black", lw=0.8, ls="--")
        if marks:
            ax.text(marks[0], len(bns) - 0.6, f" {code}", fontsize=7, va="bottom", color="white")
    ax.set_xlabel("optimizer step (green: train mode, red: eval mode)")
    ax.set_title(f"{title}: BatchNorm modes")
    return fig


def _running(history: Any, title: str, Figure: Any) -> Any | None:
    bns = [n for n in history.bn_layers if n in history.info and history.bn_info[n].get("buffers_recorded")]
    if not bns or len(history) < 2:
        return None
    layer = bns[0]
    batch = history.series(layer, "channel_mean")
    running = history.series(layer, "running_mean")
    steps = history.steps
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    ok = np.isfinite(batch).all(axis=1)
    ax.plot(steps[ok], batch[ok].mean(axis=1), ".", ms=3, label="batch mean (channel average)")
    ax.plot(steps, running.mean(axis=1), label="running_mean (channel average)")
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{title}: {layer} running statistics vs batch statistics")
    ax.legend(fontsize=7)
    return fig


def watch_figures(history: Any, title: str, events: dict[str, list[int]] | None = None) -> dict[str, bytes]:
    """The PNGs of one watched model's history, by figure name (``FIGURES``); a figure without data (no
    BatchNorm layer, a single recorded step) is left out.

    Raises:
        UsageError: matplotlib is not installed.
    """
    Figure = _figure_class()
    made = {
        "drift": _drift(history, title, Figure),
        "percentiles": _percentiles(history, title, Figure),
        "modes": _modes(history, title, Figure, events or {}),
        "running": _running(history, title, Figure),
    }
    return {name: _png(fig) for name, fig in made.items() if fig is not None}
