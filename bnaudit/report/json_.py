"""JSON output. One report renders as ``Report.to_dict()`` (``schema_version``, ``model``, ``summary``,
``findings[]``, ``layers[]``, ...); several (``bnaudit check``) as ``{"schema_version", "summary",
"reports": [...]}``. Keys are stable and documented in the README."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bnaudit.findings import SCHEMA_VERSION, Report, severity_counts


def render(reports: Sequence[Report], **opts: Any) -> str:
    if len(reports) == 1 and not opts.get("always_list"):
        data: dict[str, Any] = reports[0].to_dict()
    else:
        findings = [f for r in reports for f in r.findings]
        summary = severity_counts(findings)
        summary["total"] = len(findings)
        data = {"schema_version": SCHEMA_VERSION, "summary": summary, "reports": [r.to_dict() for r in reports]}
    extra = opts.get("extra")
    if extra:
        data.update(extra)
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
