"""Plots of a train-compare result (matplotlib, the optional ``bnaudit[plot]`` extra, imported lazily).

``figures(result)`` draws every figure to PNG bytes (the HTML report embeds them); ``write_plots(result,
folder)`` writes them as files. Figures: training loss per learning rate × batch size with a band across seeds
(mean ± std, smoothed), validation accuracy (or loss) likewise, per-layer gradient norms, the Ioffe &
Szegedy (2015) Fig. 1 view (15th/50th/85th percentiles of one unit's input over training), per-layer
activation drift when recorded, and Santurkar et al. (2018) gradient ICS when measured. Matplotlib's
object API (``Figure``) is used, not pyplot, so no GUI backend or global state is involved."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.errors import UsageError
from bnaudit.files import OutputPlan

if TYPE_CHECKING:
    from bnaudit.training.results import CompareResult, RunResult

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
FIGURES = ("loss", "accuracy", "grad_norms", "percentiles", "drift", "ics")


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'bnaudit[plot]'") from None
    return Figure


def require_matplotlib() -> None:
    """Check that plots can be drawn.

    Raises:
        UsageError: matplotlib is not installed (``pip install 'bnaudit[plot]'``).
    """
    _matplotlib()


def _np() -> Any:
    import numpy as np

    return np


def _color(result: CompareResult, variant: str) -> str:
    variants = list(result.settings.get("variants") or dict.fromkeys(r.variant for r in result.runs))
    return PALETTE[variants.index(variant) % len(PALETTE)] if variant in variants else PALETTE[-1]


def _settings(result: CompareResult) -> list[tuple[float, int]]:
    return list(dict.fromkeys((r.lr, r.batch_size) for r in result.runs))


def _variants(result: CompareResult) -> list[str]:
    return list(dict.fromkeys(r.variant for r in result.runs))


def _smooth(values: Any, width: int) -> Any:
    """Trailing moving average that keeps NaN where the run had stopped."""
    np = _np()
    if width <= 1:
        return values
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        window = window[~np.isnan(window)]
        if window.size and not np.isnan(values[i]):
            out[i] = window.mean()
    return out


def _stack(series: Sequence[Sequence[float | None]]) -> Any:
    np = _np()
    n = max((len(s) for s in series), default=0)
    arr = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        arr[i, : len(s)] = [np.nan if v is None else v for v in s]
    return arr


def _band(ax: Any, x: Any, arr: Any, color: str, label: str) -> None:
    np = _np()
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after every seed stopped
            mean = np.nanmean(arr, axis=0)
            std = np.nanstd(arr, axis=0)
    ax.plot(x, mean, color=color, label=label, linewidth=1.5)
    if arr.shape[0] > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _grid(Figure: Any, n: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    cols = min(3, max(1, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _title(lr: float, bs: int, multi_bs: bool) -> str:
    from bnaudit.training.verdict import fmt_num

    return f"lr {fmt_num(lr)}" + (f", batch {bs}" if multi_bs else "")


def focus_setting(result: CompareResult) -> tuple[float, int]:
    """The learning rate × batch size the per-layer figures show: the largest learning rate at which no
    variant diverged in every seed (where the variants can still be compared), else the first setting."""
    settings = _settings(result)
    ok = [
        (lr, bs)
        for lr, bs in settings
        if all(c.diverged < c.seeds for c in result.cells if (c.lr, c.batch_size) == (lr, bs))
    ]
    return max(ok, key=lambda s: (s[0], -s[1])) if ok else settings[0]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _loss_figure(result: CompareResult, Figure: Any) -> Any:
    np = _np()
    settings = _settings(result)
    multi_bs = len({bs for _, bs in settings}) > 1
    fig, axes = _grid(Figure, len(settings))
    target = result.settings.get("target_loss")
    for ax, (lr, bs) in zip(axes, settings):
        for v in _variants(result):
            runs = result.runs_of(v, lr, bs)
            if not runs:
                continue
            arr = _stack([r.losses for r in runs])
            width = max(1, arr.shape[1] // 50)
            arr = np.vstack([_smooth(row, width) for row in arr])
            x = np.arange(1, arr.shape[1] + 1)
            div = sum(r.diverged for r in runs)
            _band(ax, x, arr, _color(result, v), f"{v}" + (f" (diverged {div}/{len(runs)})" if div else ""))
            for r in runs:
                if r.diverged and r.diverged_at:
                    finite = [val for val in r.losses if val is not None]
                    ax.plot(
                        [r.diverged_at], [finite[-1] if finite else 1.0], "x", color=_color(result, v), markersize=8
                    )
        if target is not None:
            ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_yscale("log")
        ax.set_title(_title(lr, bs, multi_bs))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    fig.suptitle("Training loss (mean ± std across seeds, smoothed)")
    return fig


def _accuracy_figure(result: CompareResult, Figure: Any) -> Any:
    np = _np()
    settings = _settings(result)
    multi_bs = len({bs for _, bs in settings}) > 1
    has_acc = any(a is not None for r in result.runs for a in r.val_accuracies)
    fig, axes = _grid(Figure, len(settings))
    for ax, (lr, bs) in zip(axes, settings):
        for v in _variants(result):
            runs = result.runs_of(v, lr, bs)
            if not runs:
                continue
            steps = max((r.val_steps for r in runs), key=len)
            arr = _stack([r.val_accuracies if has_acc else r.val_losses for r in runs])
            if has_acc:
                arr = arr * 100.0
            _band(ax, np.asarray(steps[: arr.shape[1]]), arr[:, : len(steps)], _color(result, v), v)
        ax.set_title(_title(lr, bs, multi_bs))
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy (%)" if has_acc else "validation loss")
        ax.legend(fontsize=8)
    fig.suptitle("Validation " + ("accuracy" if has_acc else "loss") + " (mean ± std across seeds)")
    return fig


def _per_variant(result: CompareResult, Figure: Any) -> tuple[Any, list[Any], list[tuple[str, list[RunResult]]], str]:
    lr, bs = focus_setting(result)
    groups = [(v, result.runs_of(v, lr, bs)) for v in _variants(result)]
    groups = [(v, rs) for v, rs in groups if rs]
    fig, axes = _grid(Figure, len(groups))
    multi_bs = len({b for _, b in _settings(result)}) > 1
    return fig, axes, groups, _title(lr, bs, multi_bs)


def _grad_figure(result: CompareResult, Figure: Any) -> Any:
    np = _np()
    fig, axes, groups, where = _per_variant(result, Figure)
    for ax, (v, runs) in zip(axes, groups):
        layers = list(runs[0].grad_norms.get("layers", {}))
        for i, layer in enumerate(layers):
            arr = _stack([r.grad_norms.get("layers", {}).get(layer, []) for r in runs])
            steps = max((r.grad_norms.get("steps", []) for r in runs), key=len)
            if arr.size:
                _band(
                    ax,
                    np.asarray(steps[: arr.shape[1]]),
                    arr[:, : len(steps)],
                    PALETTE[i % len(PALETTE)] if i < 6 else f"C{i % 10}",
                    layer or "<root>",
                )
        ax.set_yscale("log")
        ax.set_title(f"{v} ({where})")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient L2 norm")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Per-layer gradient norms (mean ± std across seeds)")
    return fig


def _percentile_figure(result: CompareResult, Figure: Any) -> Any | None:
    np = _np()
    fig, axes, groups, where = _per_variant(result, Figure)
    drawn = False
    for ax, (v, runs) in zip(axes, groups):
        pcts = [r.percentiles for r in runs if r.percentiles and r.percentiles.get("steps")]
        if not pcts:
            ax.set_visible(False)
            continue
        steps = np.asarray(max((p["steps"] for p in pcts), key=len))
        color = _color(result, v)
        means = {}
        for key, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
            arr = _stack([p[key] for p in pcts])[:, : len(steps)]
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                means[key] = np.nanmean(arr, axis=0)
            ax.plot(steps[: arr.shape[1]], means[key], style, color=color, linewidth=1.2, label=f"{key[1:]}th")
        ax.fill_between(steps[: len(means["p15"])], means["p15"], means["p85"], color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"{v} ({where}): {pcts[0]['layer']} input, unit {pcts[0]['unit']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.legend(fontsize=8)
        drawn = True
    if not drawn:
        return None
    fig.suptitle("One unit's input over training: 15/50/85th percentiles (Ioffe & Szegedy 2015, Fig. 1)")
    return fig


def _drift_figure(result: CompareResult, Figure: Any) -> Any | None:
    np = _np()
    fig, axes, groups, where = _per_variant(result, Figure)
    drawn = False
    for ax, (v, runs) in zip(axes, groups):
        drifts = [r.drift for r in runs if r.drift and r.drift.get("steps")]
        if not drifts:
            ax.set_visible(False)
            continue
        layers = list(drifts[0].get("layers", {}))
        steps = np.asarray(max((d["steps"] for d in drifts), key=len))
        for i, layer in enumerate(layers):
            arr = _stack([d["layers"].get(layer, []) for d in drifts])[:, : len(steps)]
            _band(ax, steps[: arr.shape[1]], arr, f"C{i % 10}", layer)
        ax.set_title(f"{v} ({where})")
        ax.set_xlabel("step")
        ax.set_ylabel(drifts[0].get("measure", "drift"))
        ax.legend(fontsize=7, ncol=2)
        drawn = True
    if not drawn:
        return None
    fig.suptitle("Per-layer activation drift over training (mean ± std across seeds)")
    return fig


def _ics_figure(result: CompareResult, Figure: Any) -> Any | None:
    np = _np()
    fig, axes, groups, where = _per_variant(result, Figure)
    drawn = False
    for ax, (v, runs) in zip(axes, groups):
        ics = [r.ics for r in runs if r.ics and r.ics.get("steps")]
        if not ics:
            ax.set_visible(False)
            continue
        steps = np.asarray(max((d["steps"] for d in ics), key=len))
        arr = _stack([d["l2"] for d in ics])[:, : len(steps)]
        _band(ax, steps[: arr.shape[1]], arr, _color(result, v), "‖G − G′‖")
        ax2 = ax.twinx()
        cos = _stack([d["cosine"] for d in ics])[:, : len(steps)]
        ax2.plot(steps[: cos.shape[1]], np.nanmean(cos, axis=0), ":", color="0.3", label="cos(G, G′)")
        ax2.set_ylim(-1.05, 1.05)
        ax2.set_ylabel("cosine")
        ax.set_title(f"{v} ({where}): layer {ics[0]['layer']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("‖G − G′‖₂")
        ax.legend(fontsize=8, loc="upper left")
        ax2.legend(fontsize=8, loc="upper right")
        drawn = True
    if not drawn:
        return None
    fig.suptitle("Optimization view: gradient-based internal covariate shift (Santurkar et al. 2018)")
    return fig


def figures(result: CompareResult) -> dict[str, bytes]:
    """Every figure that has data, as PNG bytes, keyed by name (see ``FIGURES``).

    Raises:
        UsageError: matplotlib is not installed (``pip install 'bnaudit[plot]'``).
    """
    Figure = _matplotlib()
    if not result.runs:
        return {}
    out: dict[str, bytes] = {}
    makers = {
        "loss": _loss_figure,
        "accuracy": _accuracy_figure,
        "grad_norms": _grad_figure,
        "percentiles": _percentile_figure,
        "drift": _drift_figure,
        "ics": _ics_figure,
    }
    for name, make in makers.items():
        fig = make(result, Figure)
        if fig is not None:
            out[name] = _png(fig)
    return out


def write_plots(
    result: CompareResult, folder: Path | str, *, force: bool = False, pngs: dict[str, bytes] | None = None
) -> list[Path]:
    """Write every figure as ``<folder>/<name>.png`` (the folder is created, with its parents, when missing).

    Args:
        result: the comparison.
        folder: where the PNGs go.
        force: overwrite existing PNGs.
        pngs: figures already drawn by ``figures(result)`` (drawn here when None).

    Returns:
        The written paths.

    Raises:
        UsageError: matplotlib is missing. OutputError: a PNG exists without ``force``, or the folder cannot
        be created or written.
    """
    out_dir = Path(folder)
    pngs = figures(result) if pngs is None else pngs
    plan = OutputPlan()
    plan.folder(out_dir, [f"{name}.png" for name in pngs], label="--plot", replace=force)
    plan.check()  # refuse before writing anything, so a refusal leaves no half-updated folder
    return plan.commit({out_dir / f"{name}.png": data for name, data in pngs.items()})
