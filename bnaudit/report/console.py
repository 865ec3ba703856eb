"""The terminal report (rich): a per-layer table, then the findings by severity with their evidence and fix,
then a summary line. Rendered to a string so the CLI decides where it goes; ``color=False`` and a fixed
``width`` give the stable text the golden tests compare."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bnaudit.findings import SEVERITIES, Finding, Report

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _shape(shapes: Sequence[Sequence[int]]) -> str:
    return "×".join(str(d) for d in shapes[0]) if shapes else "–"


def _evidence(f: Finding) -> str:
    parts = []
    for key, value in f.evidence.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _layer_table(report: Report) -> Table:
    codes: dict[str | None, list[str]] = defaultdict(list)
    for f in report.findings:
        codes[f.layer].append(f.code)
    table = Table(title=None, show_lines=False, header_style="bold", expand=False)
    for col in ("layer", "type", "input", "output", "calls", "norm", "findings"):
        table.add_column(col, overflow="fold")
    for layer in report.layers:
        found = codes.get(layer.name, [])
        worst = next((s for s in SEVERITIES if any(f.layer == layer.name and f.severity == s for f in report.findings)), None)
        table.add_row(
            escape(layer.name),
            layer.type,
            _shape(layer.input_shapes),
            _shape(layer.output_shapes),
            str(layer.calls) if layer.calls != 1 else "",
            layer.normalization or "",
            Text(" ".join(sorted(set(found))), style=_STYLE.get(worst or "", "")),
        )
    return table


def _findings(report: Report) -> list[Any]:
    out: list[Any] = []
    for f in report.findings:
        head = Text()
        head.append(f"{f.severity:<7} ", style=_STYLE[f.severity])
        head.append(f"{f.code} {f.name}", style="bold")
        if f.layer:
            head.append(f"  {f.layer}")
        out.append(head)
        out.append(Padding(Text(f.message), (0, 0, 0, 2)))
        if f.evidence:
            out.append(Padding(Text("evidence: " + _evidence(f), style="dim"), (0, 0, 0, 2)))
        out.append(Padding(Text("fix: " + f.fix, style="green"), (0, 0, 0, 2)))
    return out


def _summary(report: Report) -> Text:
    s = report.summary
    parts = [f"{s[k]} {k}{'s' if s[k] != 1 else ''}" for k in SEVERITIES]
    text = Text("Summary: " + ", ".join(parts), style="bold")
    text.append(f" · {len(report.rules_run)} rules run")
    if report.rules_skipped:
        reasons: dict[str, list[str]] = defaultdict(list)
        for code, why in sorted(report.rules_skipped.items()):
            reasons[why].append(code)
        text.append(", skipped: " + "; ".join(f"{' '.join(c)} ({why})" for why, c in reasons.items()))
    return text


def render_one(report: Report, *, layers: bool = True) -> Group:
    items: list[Any] = [Text(f"bnaudit inspect {report.model}", style="bold")]
    note = f"graph: {report.graph_method}" + (f" ({report.graph_note})" if report.graph_note else "")
    items.append(Text(note, style="dim"))
    if "example_input" in report.meta:
        items.append(Text(f"example input: {report.meta['example_input']}", style="dim"))
    if layers and report.layers:
        items.append(_layer_table(report))
    if report.findings:
        items.append(Text(""))
        items.extend(_findings(report))
    else:
        items.append(Text("No findings.", style="green"))
    items.append(Text(""))
    items.append(_summary(report))
    return Group(*items)


def render(reports: Sequence[Report], *, width: int | None = 100, color: bool = False, layers: bool = True, **_: Any) -> str:
    buf = io.StringIO()
    console = Console(
        file=buf, width=width or 100, force_terminal=color, color_system="standard" if color else None,
        no_color=not color, highlight=False, soft_wrap=False, emoji=False,
    )
    for i, report in enumerate(reports):
        if i:
            console.print()
        console.print(render_one(report, layers=layers))
    # Padding fills lines to the full width; trailing blanks only make golden files brittle.
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
