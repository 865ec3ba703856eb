"""Markdown output for pull-request comments and job summaries (``$GITHUB_STEP_SUMMARY``): a headline with
the counts, then per audit a table of findings (severity, code, layer, message) and the fixes folded in a
``<details>`` block so a long report stays short on the page. Cell text is escaped so a message containing
``|`` or a newline cannot break the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bnaudit.findings import Report, severity_counts

ICONS = {"error": ":x:", "warning": ":warning:", "info": ":information_source:"}


def cell(text: str) -> str:
    """Text safe inside a table cell: pipes escaped, line breaks as <br>."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render(reports: Sequence[Report], **opts: Any) -> str:
    """A Markdown document for ``reports``.

    Args:
        reports: one Report per audit.
        **opts: ``title`` (default ``bnaudit``) and ``fail_on`` (when given, the headline says whether the
            gate passed). Others are ignored.

    Returns:
        Markdown text ending in a newline.
    """
    counts = severity_counts(f for r in reports for f in r.findings)
    title = opts.get("title") or "bnaudit"
    head = (f"## {title}: {_plural(counts['error'], 'error')}, {_plural(counts['warning'], 'warning')}, "
            f"{counts['info']} info in {_plural(len(reports), 'audit')}")
    out = [head, ""]
    fail_on = opts.get("fail_on")
    if fail_on:
        from bnaudit.findings import fails

        failed = fails([f for r in reports for f in r.findings], fail_on)
        out += [f"**{'Failed' if failed else 'Passed'}** (fail_on: `{fail_on}`)", ""]
    for report in reports:
        audit = str(report.meta.get("audit") or report.model)
        heading = f"### `{audit}`" + (f" (`{report.model}`)" if report.model != audit else "")
        out += [heading, ""]
        if not report.findings:
            out += [":white_check_mark: No findings.", ""]
        else:
            out += ["| Severity | Rule | Layer | Finding |", "| --- | --- | --- | --- |"]
            for f in report.findings:
                layer = f"`{cell(f.layer)}`" if f.layer else "(model)"
                out.append(f"| {ICONS[f.severity]} {f.severity} | {f.code} `{f.name}` | {layer} | {cell(f.message)} |")
            out += ["", "<details><summary>How to fix</summary>", ""]
            for f in report.findings:
                where = f" `{f.layer}`" if f.layer else ""
                out.append(f"- **{f.code}**{where}: {cell(f.fix)}")
            out += ["", "</details>", ""]
        if report.rules_skipped:
            skipped = ", ".join(f"{code} ({reason})" for code, reason in sorted(report.rules_skipped.items()))
            out += [f"<sub>Skipped: {cell(skipped)}</sub>", ""]
    return "\n".join(out).rstrip("\n") + "\n"


__all__ = ["cell", "render"]
