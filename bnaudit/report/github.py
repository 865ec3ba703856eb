"""GitHub Actions workflow commands: one ``::error``/``::warning``/``::notice`` line per finding, which the
Actions runner turns into annotations on the pull request (on the model file when it is in the repository),
then one plain summary line for the log. Values are escaped the way the runner's toolkit expects (``%``,
CR, LF everywhere; also ``:`` and ``,`` inside properties), so a message can never inject a second
command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit.findings import Report, severity_counts
from bnaudit.report.sarif import artifact_uri

COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render(reports: Sequence[Report], **opts: Any) -> str:
    """Workflow-command lines for ``reports``.

    Args:
        reports: one Report per audit.
        **opts: ``root`` (folder file paths are made relative to, default the working directory) and
            ``default_uri`` (file to annotate when a report has no source file). Others are ignored.

    Returns:
        One line per finding and a summary line, ending in a newline.
    """
    root: str | Path | None = opts.get("root")
    lines = []
    findings = []
    for report in reports:
        uri = artifact_uri(report.source_path, root) or opts.get("default_uri")
        for f in report.findings:
            findings.append(f)
            audit = f.audit or report.model
            props = []
            if uri and "://" not in uri:
                props += [f"file={escape_property(uri)}", f"line={report.line_of(f.layer)}"]
            props.append(f"title={escape_property(f'bnaudit {f.code} {f.name}')}")
            where = f"layer {f.layer}" if f.layer else "model-wide"
            body = f"[{audit}] {where}: {f.message}\nFix: {f.fix}"
            lines.append(f"::{COMMANDS[f.severity]} {','.join(props)}::{escape_data(body)}")
    counts = severity_counts(findings)
    n = len(reports)
    lines.append(
        f"bnaudit: {n} audit{'s' if n != 1 else ''}: {counts['error']} error(s), {counts['warning']} warning(s), "
        f"{counts['info']} info"
    )
    return "\n".join(lines) + "\n"


__all__ = ["escape_data", "escape_property", "render"]
