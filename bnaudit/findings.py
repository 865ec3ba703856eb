"""Finding and Report: the plain, frozen records every rule produces and every renderer reads.

They sit at the bottom of the import graph (no torch, no rich) so that renderers, the config layer and the
CLI can use them without loading a model. ``Report.to_dict()`` is the stable JSON shape documented in the
README (``schema_version`` bumps on any incompatible change).

Floats in that JSON (evidence and meta) are rounded to ``EVIDENCE_DIGITS`` significant digits, here and
nowhere else. The numbers come from torch kernels whose last bits depend on the thread count (a threaded
BatchNorm or matrix product adds in another order): measured between 1 and 2 threads on the test models,
recorded activation statistics differed by up to a few 1e-6 relative and findings' evidence by up to 1e-7
(a loss ratio of 27.8405157 against 27.8405134). Four significant digits hide that unless a value lies within
that distance of a rounding boundary (at most about one value in a thousand), match what the console prints
(``.4g``) and keep more digits than a measurement on a few batches is worth; the decimal rounding before (6
places) printed that noise in large values and zeroed small ones (a second moment of 1e-8).
``Finding.evidence`` itself keeps full precision for Python callers. Rules decide on their own margins (BN203's
confidence bound, for one), never on a rounded number."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

SCHEMA_VERSION = 1
EVIDENCE_DIGITS = 4  # significant digits of floats in the JSON report

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
FAIL_ON_CHOICES = ("error", "warning", "info", "never")


def check_severity(value: str) -> str:
    """Return ``value`` if it names a severity, else raise ValueError naming the choices."""
    if value not in SEVERITY_RANK:
        raise ValueError(f"unknown severity {value!r}; choose one of {', '.join(SEVERITIES)}")
    return value


def round_significant(value: float, digits: int = EVIDENCE_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (NaN, Inf and 0 unchanged)."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def _plain(value: Any) -> Any:
    """Evidence values as JSON-ready Python: floats to EVIDENCE_DIGITS significant digits, tuples as lists."""
    if isinstance(value, float):
        return round_significant(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        try:
            return _plain(value.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)


@dataclass(frozen=True)
class Finding:
    """One problem found by one rule.

    Attributes:
        code: stable rule code, e.g. ``BN101``.
        name: the rule's kebab-case slug, e.g. ``redundant-bias``.
        severity: ``error``, ``warning`` or ``info``.
        layer: qualified module name (``features.0``) or None for model-wide findings.
        message: what is wrong, with the numbers.
        fix: what to change, naming the bnaudit command that repairs it where one exists.
        evidence: the numbers that justified the finding, including the threshold crossed.
        audit: the name of the audit (model spec or config entry) that produced it.
        step: the training step at which it was seen (``bnaudit watch``), or None.
        location: ``file:line`` in the user's code where the offending call was made, or None.
    """

    code: str
    name: str
    severity: str
    layer: str | None
    message: str
    fix: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    audit: str | None = None
    step: int | None = None
    location: str | None = None

    def sort_key(self) -> tuple:
        return (-SEVERITY_RANK[self.severity], self.audit or "", self.code, self.layer or "", self.message)

    def with_severity(self, severity: str) -> Finding:
        return replace(self, severity=check_severity(severity))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; evidence floats rounded to ``EVIDENCE_DIGITS`` significant digits. ``step`` and
        ``location`` appear only when set, so reports without them keep their shape."""
        out = {
            "code": self.code,
            "name": self.name,
            "severity": self.severity,
            "layer": self.layer,
            "message": self.message,
            "fix": self.fix,
            "evidence": _plain(dict(self.evidence)),
            "audit": self.audit,
        }
        if self.step is not None:
            out["step"] = self.step
        if self.location is not None:
            out["location"] = self.location
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            code=data["code"],
            name=data["name"],
            severity=data["severity"],
            layer=data.get("layer"),
            message=data["message"],
            fix=data.get("fix", ""),
            evidence=dict(data.get("evidence") or {}),
            audit=data.get("audit"),
            step=data.get("step"),
            location=data.get("location"),
        )


@dataclass(frozen=True)
class LayerInfo:
    """One leaf module as seen by the layer graph, for the report's per-layer table."""

    name: str
    type: str
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shapes: tuple[tuple[int, ...], ...] = ()
    calls: int = 0
    normalization: str | None = None
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "input_shapes": [list(s) for s in self.input_shapes],
            "output_shapes": [list(s) for s in self.output_shapes],
            "calls": self.calls,
            "normalization": self.normalization,
            "params": self.params,
        }


def sort_findings(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Deterministic order: severity (worst first), audit, code, layer, message."""
    return tuple(sorted(findings, key=Finding.sort_key))


def severity_counts(findings: Iterable[Finding]) -> dict[str, int]:
    counts = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        counts[f.severity] += 1
    return counts


def fails(findings: Iterable[Finding], fail_on: str) -> bool:
    """True when any finding is at or above ``fail_on`` (``never`` never fails)."""
    if fail_on == "never":
        return False
    threshold = SEVERITY_RANK[check_severity(fail_on)]
    return any(SEVERITY_RANK[f.severity] >= threshold for f in findings)


@dataclass(frozen=True)
class Report:
    """The result of one audit: findings plus what was looked at.

    Attributes:
        model: the model spec or class name audited.
        findings: sorted findings.
        layers: the per-layer table, in execution order.
        graph_method: ``fx`` or ``hooks`` (how dataflow was found), with ``graph_note`` saying why.
        rules_run: codes of the rules that ran.
        rules_skipped: code -> reason (e.g. ``needs --data``).
        source_path: the file the model came from, when known (SARIF locations use it).
        source_lines: layer -> the line of ``source_path`` that creates it (``""``: the model's own line), for
            the formats that point at lines; empty when unknown.
        meta: anything else worth keeping (data spec, batch size, device, torch version).
    """

    model: str
    findings: tuple[Finding, ...] = ()
    layers: tuple[LayerInfo, ...] = ()
    graph_method: str = "none"
    graph_note: str = ""
    rules_run: tuple[str, ...] = ()
    rules_skipped: Mapping[str, str] = field(default_factory=dict)
    source_path: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    source_lines: Mapping[str, int] = field(default_factory=dict)

    def line_of(self, layer: str | None) -> int:
        """The source line a finding on ``layer`` points at: the layer's, else the model's, else 1."""
        return int(self.source_lines.get(layer or "", self.source_lines.get("", 1)))

    @property
    def summary(self) -> dict[str, int]:
        counts = severity_counts(self.findings)
        counts["total"] = len(self.findings)
        return counts

    def fails(self, fail_on: str) -> bool:
        return fails(self.findings, fail_on)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "source_path": self.source_path,
            "source_lines": dict(self.source_lines),
            "graph": {"method": self.graph_method, "note": self.graph_note},
            "summary": self.summary,
            "findings": [f.to_dict() for f in self.findings],
            "layers": [layer.to_dict() for layer in self.layers],
            "rules_run": list(self.rules_run),
            "rules_skipped": dict(self.rules_skipped),
            "meta": _plain(dict(self.meta)),
        }
