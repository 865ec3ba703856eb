"""SARIF 2.1.0 output, the format code-scanning services (GitHub, Azure DevOps, IDE viewers) read.

All audits go into one run of one tool, ``bnaudit``. Rule metadata (summary, documentation, default level)
comes from the rule registry; a code the registry does not know (a plugin that is not installed here) falls
back to what its findings carry. A finding's location is the model's source file, at the line that creates its layer (``self.fc =
...`` in a class of that file; else its nearest located ancestor's line, else the line of what the spec
named, else 1: see ``report.locations``), plus a logical location naming the layer, and the layer is also
named in the message, because most viewers show only the message. ``partialFingerprints`` hold a hash of
code + audit + layer, the same identity the baseline uses, so services track a finding across runs even when
its message's numbers change."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit.findings import Finding, Report

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}
INFORMATION_URI = "https://pypi.org/project/bnaudit/"


def artifact_uri(path: str | None, root: str | Path | None = None) -> str | None:
    """``path`` as a URI reference: relative (POSIX separators) when it lies under ``root`` (default: the
    working directory), so CI services map it onto the repository; an absolute ``file://`` URI otherwise."""
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    base = (Path(root) if root is not None else Path.cwd()).resolve()
    try:
        return p.resolve().relative_to(base).as_posix()
    except ValueError:
        return p.as_uri()


def fingerprint(finding: Finding) -> str:
    """A stable id for a finding across runs: code + audit + layer, never the message."""
    key = f"{finding.code}|{finding.audit or ''}|{finding.layer or ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def finding_text(finding: Finding, report: Report) -> str:
    """The one-line message shown by viewers: audit, layer, what is wrong."""
    audit = finding.audit or report.model
    where = f"layer {finding.layer}" if finding.layer else "model-wide"
    return f"[{audit}] {where}: {finding.message}"


def _rule_descriptor(code: str, sample: Finding | None) -> dict[str, Any]:
    try:
        from bnaudit.rules.catalog import get_rule

        rule = get_rule(code)
    except Exception:  # unknown code, or a rule family that fails to import: describe it from its finding
        rule = None
    if rule is not None:
        doc = rule.doc() or rule.summary
        return {
            "id": rule.code,
            "name": rule.name,
            "shortDescription": {"text": rule.summary},
            "fullDescription": {"text": doc.split("\n\n")[0].replace("\n", " ")},
            "help": {"text": f"{doc}\n\nFix: {rule.fix}", "markdown": f"{doc}\n\n**Fix:** {rule.fix}"},
            "defaultConfiguration": {"level": LEVELS[rule.severity]},
            "properties": {"tags": ["normalization", rule.family]},
        }
    descriptor: dict[str, Any] = {"id": code}
    if sample is not None:
        descriptor.update(
            name=sample.name,
            shortDescription={"text": sample.name.replace("-", " ")},
            help={"text": f"Fix: {sample.fix}"},
            defaultConfiguration={"level": LEVELS[sample.severity]},
        )
    return descriptor


def to_sarif(reports: Sequence[Report], *, root: str | Path | None = None, default_uri: str | None = None,
             tool_version: str | None = None) -> dict[str, Any]:
    """The SARIF log as a dict (``render`` serializes it).

    Args:
        reports: one Report per audit.
        root: folder artifact URIs are made relative to (default: the working directory).
        default_uri: location for findings whose report has no source file (e.g. the bnaudit.yaml).
        tool_version: the version written in the log (default: bnaudit's).
    """
    from bnaudit import __version__

    samples: dict[str, Finding] = {}
    codes: set[str] = set()
    for report in reports:
        codes.update(report.rules_run)
        for f in report.findings:
            samples.setdefault(f.code, f)
            codes.add(f.code)
    ordered = sorted(codes)
    rules = [_rule_descriptor(code, samples.get(code)) for code in ordered]
    index = {code: i for i, code in enumerate(ordered)}

    results = []
    for report in reports:
        uri = artifact_uri(report.source_path, root) or default_uri
        for f in report.findings:
            result: dict[str, Any] = {
                "ruleId": f.code,
                "ruleIndex": index[f.code],
                "level": LEVELS[f.severity],
                "message": {"text": finding_text(f, report)},
                "partialFingerprints": {"bnauditFinding/v1": fingerprint(f)},
                "properties": {
                    "audit": f.audit or report.model,
                    "layer": f.layer,
                    "fix": f.fix,
                    "evidence": f.to_dict()["evidence"],
                },
            }
            location: dict[str, Any] = {}
            if uri:
                location["physicalLocation"] = {"artifactLocation": {"uri": uri},
                                                "region": {"startLine": report.line_of(f.layer)}}
            if f.layer:
                location["logicalLocations"] = [
                    {"name": f.layer, "fullyQualifiedName": f"{f.audit or report.model}/{f.layer}", "kind": "member"}
                ]
            if location:
                result["locations"] = [location]
            results.append(result)

    version = tool_version or __version__
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "bnaudit",
                "version": version,
                "semanticVersion": version,
                "informationUri": INFORMATION_URI,
                "rules": rules,
            }
        },
        "invocations": [{"executionSuccessful": True}],
        "results": results,
        "properties": {
            "audits": [
                {
                    "audit": r.meta.get("audit", r.model),
                    "model": r.model,
                    "graph": r.graph_method,
                    "rules_skipped": dict(r.rules_skipped),
                }
                for r in reports
            ]
        },
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def render(reports: Sequence[Report], **opts: Any) -> str:
    """SARIF 2.1.0 JSON text for ``reports``.

    Args:
        reports: one Report per audit.
        **opts: ``root``, ``default_uri`` and ``tool_version`` as for ``to_sarif``; other options are ignored
            so every renderer can be called the same way.

    Returns:
        The SARIF log, indented, ending in a newline.
    """
    keep = {k: opts[k] for k in ("root", "default_uri", "tool_version") if opts.get(k) is not None}
    return json.dumps(to_sarif(reports, **keep), indent=2) + "\n"


__all__ = ["artifact_uri", "fingerprint", "render", "to_sarif"]
