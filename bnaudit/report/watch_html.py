"""A self-contained HTML page for a watched training run (``bnaudit watch``): the program and its outcome, per
model its steps, findings (with step and the user's file:line) and plots, embedded as base64 PNGs (no
external files, scripts or fonts)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from bnaudit import __version__
from bnaudit.findings import Report

__all__ = ["render_watch"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.88em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}.error{color:#b00020;font-weight:600}.warning{color:#a15c00}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:.1em .3em}
.muted{color:#666;font-size:.85em}
"""

CAPTIONS = {
    "drift": "The most drifting layers: mean shift per channel from the first steps, in early standard deviations.",
    "percentiles": "15th/50th/85th percentiles of the most drifting unit (Ioffe & Szegedy 2015, Fig. 1 view).",
    "modes": "BatchNorm train (green) / eval (red) mode at every recorded step; dashed lines mark live findings.",
    "running": "A BatchNorm layer's running mean against the batch means it normalized with.",
}


def _findings_table(report: Report) -> list[str]:
    esc = html.escape
    if not report.findings:
        return ["<p>No findings.</p>"]
    head = "".join(f"<th>{h}</th>" for h in ("code", "severity", "step", "layer", "where", "message", "fix"))
    rows = [f"<table><tr>{head}</tr>"]
    for f in report.findings:
        rows.append(
            f"<tr><td>{esc(f.code)}</td><td class='{esc(f.severity)}'>{esc(f.severity)}</td>"
            f"<td>{'' if f.step is None else f.step}</td><td>{esc(f.layer or '')}</td>"
            f"<td><code>{esc(f.location or '')}</code></td><td>{esc(f.message)}</td><td>{esc(f.fix)}</td></tr>"
        )
    rows.append("</table>")
    return rows


def render_watch(reports: Sequence[Report], pngs: Mapping[str, Mapping[str, bytes]], program: Mapping[str, Any],
                 drifting: Mapping[str, Sequence[tuple[str, float]]] | None = None) -> str:
    """The page as one HTML string.

    Args:
        reports: one Report per watched model.
        pngs: model name -> figure name -> PNG bytes.
        program: facts about the run (``command``, ``exit_code``, ``outcome``).
        drifting: model name -> [(layer, shift in early stds)], the most drifting layers.
    """
    esc = html.escape
    cmd = program.get("command", "")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>bnaudit watch {esc(str(cmd))}</title><style>{_CSS}</style></head><body>",
             f"<h1>bnaudit watch <code>{esc(str(cmd))}</code></h1>",
             (f"<p>Outcome: {esc(str(program.get('outcome', '')))} (exit status "
              f"{esc(str(program.get('exit_code', '')))}). {len(reports)} model(s) watched.</p>")]
    if not reports:
        parts.append("<p>No model was trained: no optimizer.step() ran inside the program.</p>")
    for r in reports:
        meta = r.meta
        parts += [f"<h2>{esc(r.model)}</h2>",
                  (f"<p>{meta.get('steps', 0)} optimizer steps ({esc(str(meta.get('optimizer', '')))}), "
                   f"{meta.get('recorded_steps', 0)} history rows, {meta.get('layers_recorded', 0)} layers, "
                   f"{meta.get('batchnorm_layers', 0)} BatchNorm layers.</p>")]
        parts += _findings_table(r)
        top = (drifting or {}).get(r.model) or []
        if top:
            parts.append("<p>Most drifting layers: " + ", ".join(f"<code>{esc(n)}</code> {s:.3g}" for n, s in top)
                         + " (mean shift in early standard deviations)</p>")
        for note in meta.get("notes", []) or []:
            parts.append(f"<p class='muted'>note: {esc(str(note))}</p>")
        for name, data in (pngs.get(r.model) or {}).items():
            b64 = base64.b64encode(data).decode("ascii")
            parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{esc(CAPTIONS.get(name, name))}</figcaption></figure>")
    parts.append(f"<p class='muted'>bnaudit {esc(__version__)}</p></body></html>")
    return "\n".join(parts) + "\n"
