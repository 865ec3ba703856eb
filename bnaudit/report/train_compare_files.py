"""The files ``bnaudit train-compare`` writes from a CompareResult: the table or JSON text, the PNG figures and
the HTML report, planned together before training (a refusal after minutes of work helps no one) and then
drawn as one set for an ``OutputPlan`` to write, all of them or none. Nothing here prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnaudit.files import OutputPlan

__all__ = ["comparison_files", "plan_comparison", "render_comparison"]


def plan_comparison(plan: OutputPlan, *, output: Path | None, html: Path | None, plot: Path | None, force: bool) -> None:
    """Declare every output on ``plan`` and check them; refuse early when plots are asked for and matplotlib
    (the plot extra) is missing.

    Raises:
        OutputError: an output exists without ``force``, or is an input. UsageError: no matplotlib.
    """
    plan.file(output, label="--output", replace=force)
    plan.file(html, label="--html", replace=force)
    if plot is not None:
        from bnaudit.report.plots import FIGURES

        # Which figures a run draws depends on its results; any of them may be written.
        plan.folder(plot, [f"{name}.png" for name in FIGURES], label="--plot", replace=force)
    plan.check()
    if plot is not None or html is not None:
        from bnaudit.report.plots import require_matplotlib

        require_matplotlib()


def render_comparison(result: Any, fmt: str, *, color: bool) -> str:
    """The comparison as text: ``json`` (``CompareResult.to_json``) or ``table`` (the summary and verdict)."""
    if fmt == "json":
        return result.to_json()
    from bnaudit.report.train_compare import render_table

    return render_table(result, color=color)


def comparison_files(
    result: Any, text: str, *, output: Path | None, html: Path | None, plot: Path | None
) -> tuple[dict[Path, Any], list[str]]:
    """Every file to write (path -> text or bytes) and the names of the PNG figures drawn; the figures are
    drawn once for both the PNG files and the HTML report."""
    files: dict[Path, Any] = {}
    if output is not None:
        files[output] = text
    pngs: dict[str, bytes] = {}
    if plot is not None or html is not None:
        from bnaudit.report.plots import figures

        pngs = figures(result)
        if plot is not None:
            files.update({plot / f"{name}.png": data for name, data in pngs.items()})
        if html is not None:
            from bnaudit.report.html import render

            files[html] = render(result, pngs=pngs)
    return files, [f"{name}.png" for name in pngs]
