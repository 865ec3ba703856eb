"""A self-contained HTML report of a train-compare result: the settings, the verdict, the summary table with
the best cells highlighted, the notes, and every plot embedded as a base64 PNG (no external files, scripts or
fonts, so the file can be attached to a CI run or mailed as is)."""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING

from bnaudit import __version__

if TYPE_CHECKING:
    from bnaudit.training.results import CompareResult

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}td.best{background:#d8f5d0;font-weight:600}
ul.verdict li{margin:.3em 0}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
code,pre{background:#f6f6f6;padding:.1em .3em}.muted{color:#666;font-size:.85em}
"""

CAPTIONS = {
    "loss": "Training loss per learning rate (mean ± std across seeds, smoothed; × marks a divergence).",
    "accuracy": "Validation accuracy (or loss) per learning rate, mean ± std across seeds.",
    "grad_norms": "Per-layer gradient norms over training.",
    "percentiles": "Fig. 1 view: 15th/50th/85th percentiles of one unit's input over training.",
    "drift": "Per-layer activation drift over training (bnaudit.record).",
    "ics": "Optimization view (Santurkar et al. 2018): ‖G − G′‖ and cos(G, G′) for one layer.",
}


def render(
    result: CompareResult, *, title: str | None = None, plots: bool = True, pngs: dict[str, bytes] | None = None
) -> str:
    """The report as one HTML string.

    Args:
        result: the comparison.
        title: the page title (default names the variants).
        plots: embed the figures (needs matplotlib; ``pip install 'bnaudit[plot]'``).
        pngs: figures already drawn by ``bnaudit.report.plots.figures`` (drawn here when None).

    Returns:
        The HTML document.

    Raises:
        UsageError: ``plots`` is true and matplotlib is missing.
    """
    from bnaudit.training.table import HEADERS, summary_rows

    esc = html.escape
    s = result.settings
    title = title or "bnaudit train-compare: " + " vs ".join(s.get("variants", []))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<p class="muted">'
        + esc(
            f"{s.get('optimizer')} · loss {s.get('loss')} · target loss {s.get('target_loss')} · "
            f"seeds {s.get('seeds')} · steps {s.get('steps')} · {s.get('train_examples')} train / "
            f"{s.get('val_examples')} validation examples · {s.get('seconds_total', 0):.1f} s "
            f"({s.get('seconds_per_run', 0):.2f} s per run) · bnaudit {__version__}, torch {s.get('torch')}"
        )
        + "</p>",
        "<h2>Verdict</h2>",
        '<ul class="verdict">' + "".join(f"<li>{esc(v)}</li>" for v in result.verdict) + "</ul>",
        "<h2>Summary (mean ± std across seeds)</h2>",
        "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>",
    ]
    for row in summary_rows(result):
        cells = "".join(
            f'<td class="best">{esc(v)}</td>' if h in row.best else f"<td>{esc(v)}</td>"
            for h, v in zip(HEADERS, row.cells)
        )
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table>")
    parts.append('<p class="muted">Highlighted: the best cell per column among cells with no divergence.</p>')
    if plots:
        if pngs is None:
            from bnaudit.report.plots import figures

            pngs = figures(result)
        if pngs:
            parts.append("<h2>Plots</h2>")
        for name, data in pngs.items():
            b64 = base64.b64encode(data).decode("ascii")
            parts.append(
                f'<figure id="{esc(name)}"><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{esc(CAPTIONS.get(name, name))}</figcaption></figure>"
            )
    unavailable = getattr(result, "unavailable", None) or {}
    if unavailable:
        parts.append(
            "<h2>Variants not run</h2><ul>"
            + "".join(f"<li>{esc(name)}: {esc(why)}</li>" for name, why in sorted(unavailable.items()))
            + "</ul>"
        )
    if result.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in result.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
