"""The output folder of a watched run: ``report.json`` (one inspect-schema report per model, findings with
``step`` and ``location``, plus a ``watch`` block about the program), ``report.html`` (self-contained), and per
model ``NAME.history.pt`` (``History.load`` reads it), ``NAME.history.csv`` and ``NAME-<figure>.png``.

An existing folder is never written into without ``force``: the next free ``NAME-2``, ``NAME-3``... is used
instead (an empty folder counts as free). Everything is written together through ``bnaudit.files.OutputPlan``
(all files or none)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.files import OutputPlan

if TYPE_CHECKING:
    from bnaudit.watching.session import Watch

__all__ = ["fresh_folder", "write_outputs"]


def _taken(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def fresh_folder(out: Path, *, force: bool) -> Path:
    """``out`` itself when it is free or ``force`` is given, else the first free ``out-2``, ``out-3``..."""
    if force or not _taken(out):
        return out
    k = 2
    while _taken(out.with_name(f"{out.name}-{k}")):
        k += 1
    return out.with_name(f"{out.name}-{k}")


def _events(report: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for f in report.findings:
        if f.step is not None and f.code in ("BN306", "BN307", "BN209"):
            at = f.evidence.get("at_steps") or [f.step]
            out.setdefault(f.code, []).extend(int(s) for s in at)
    return out


def most_drifting(history: Any, top: int = 5) -> list[tuple[str, float]]:
    """The ``top`` layers whose activations drifted most (mean shift in early standard deviations)."""
    import numpy as np

    from bnaudit.recording.measures import drift_all

    if len(history) < 2:
        return []
    drifts = [(d.layer, float(d.shift)) for d in drift_all(history).values() if np.isfinite(d.shift)]
    return sorted(drifts, key=lambda t: -t[1])[:top]


def _saver(history: Any, torch: Any) -> Callable[[Path], None]:
    payload = history.to_payload()
    return lambda tmp: torch.save(payload, tmp)


def _csv_writer(history: Any) -> Callable[[Path], None]:
    return lambda tmp: history.to_csv(tmp, force=True)  # atomic onto the plan's own temporary file


def write_outputs(w: Watch, out: Path, *, force: bool, program: Mapping[str, Any], plots: bool = True) -> Path:
    """Write the folder for a closed Watch and return where it went.

    Raises:
        OutputError: the folder cannot be written.
        UsageError: ``plots`` without matplotlib.
    """
    import torch

    from bnaudit.report import render
    from bnaudit.report.watch_html import render_watch

    folder = fresh_folder(out, force=force)
    contents: dict[Path, Any] = {}
    pngs: dict[str, dict[str, bytes]] = {}
    drifting: dict[str, list[tuple[str, float]]] = {}
    for model, report in zip(w.models, w.reports, strict=True):
        h = model.history
        drifting[model.name] = most_drifting(h)
        if plots:
            from bnaudit.report.watch_plots import watch_figures

            pngs[model.name] = watch_figures(h, model.name, _events(report))
            for fig, data in pngs[model.name].items():
                contents[folder / f"{model.name}-{fig}.png"] = data
        if len(h):
            contents[folder / f"{model.name}.history.pt"] = _saver(h, torch)
            contents[folder / f"{model.name}.history.csv"] = _csv_writer(h)
    extra = {"watch": {**program, "models": [m.name for m in w.models], "notes": list(w.notes),
                       "most_drifting": {k: [[n, round(s, 4)] for n, s in v] for k, v in drifting.items()}}}
    contents[folder / "report.json"] = render(w.reports, "json", always_list=True, extra=extra)
    contents[folder / "report.html"] = render_watch(w.reports, pngs, program, drifting)
    plan = OutputPlan()
    plan.folder(folder, [p.name for p in contents], label="--out", replace=force)
    plan.check()
    plan.commit(contents)
    return folder
