"""JUnit XML output, the test-report format every CI system displays (GitLab, Jenkins, Azure, CircleCI).

Each audit is a ``<testsuite>``; each rule that ran on it is a ``<testcase>`` (a rule x audit matrix), so a
CI's test view shows which rules pass on which model. A testcase fails when its rule produced a finding at
or above ``fail_on``; findings below it are listed in ``<system-out>``; a rule the audit could not run (it
needs data, a training history...) is ``<skipped>`` with the reason."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from bnaudit.findings import SEVERITY_RANK, Finding, Report


def _line(f: Finding) -> str:
    where = f.layer or "model-wide"
    return f"{f.severity} {f.code} {where}: {f.message}\n  fix: {f.fix}"


def to_element(reports: Sequence[Report], *, fail_on: str = "warning") -> ET.Element:
    """The ``<testsuites>`` element for ``reports``.

    Args:
        reports: one Report per audit.
        fail_on: lowest severity that fails a testcase (``never``: none fails).
    """
    threshold = SEVERITY_RANK.get(fail_on, len(SEVERITY_RANK))  # "never" ranks above every severity
    root = ET.Element("testsuites", name="bnaudit")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for report in reports:
        audit = str(report.meta.get("audit") or report.model)
        by_code: dict[str, list[Finding]] = {}
        for f in report.findings:
            by_code.setdefault(f.code, []).append(f)
        names = {f.code: f.name for f in report.findings}
        codes = sorted(set(report.rules_run) | set(report.rules_skipped) | set(by_code))
        suite = ET.SubElement(root, "testsuite", name=audit)
        # <properties> comes first in a testsuite (the JUnit XSD's order; strict parsers such as Jenkins' check it).
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="model", value=report.model)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for code in codes:
            name = names.get(code) or _rule_name(code)
            case = ET.SubElement(suite, "testcase", name=f"{code} {name}".strip(), classname=f"bnaudit.{audit}",
                                 time="0")
            counts["tests"] += 1
            found = by_code.get(code, [])
            failing = [f for f in found if SEVERITY_RANK[f.severity] >= threshold]
            if code in report.rules_skipped and not found:
                ET.SubElement(case, "skipped", message=str(report.rules_skipped[code]))
                counts["skipped"] += 1
            elif failing:
                worst = max(failing, key=lambda f: SEVERITY_RANK[f.severity])
                n = len(failing)
                message = worst.message if n == 1 else f"{n} findings; first: {worst.message}"
                failure = ET.SubElement(case, "failure", message=message, type=worst.severity)
                failure.text = "\n".join(_line(f) for f in failing)
                counts["failures"] += 1
            below = [f for f in found if f not in failing]
            if below:
                ET.SubElement(case, "system-out").text = "\n".join(_line(f) for f in below)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        suite.set("time", "0")
    for key, value in totals.items():
        root.set(key, str(value))
    return root


def _rule_name(code: str) -> str:
    try:
        from bnaudit.rules.catalog import get_rule

        return get_rule(code).name
    except Exception:  # a code this installation does not know: the testcase is named by code alone
        return ""


def render(reports: Sequence[Report], **opts: Any) -> str:
    """JUnit XML text for ``reports``.

    Args:
        reports: one Report per audit.
        **opts: ``fail_on`` (default ``warning``): lowest severity that fails a testcase. Others are ignored.

    Returns:
        An XML document with declaration, indented, ending in a newline.
    """
    root = to_element(reports, fail_on=opts.get("fail_on") or "warning")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


__all__ = ["render", "to_element"]
