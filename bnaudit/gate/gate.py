"""The CI gate behind ``bnaudit check``: run every audit of a validated config through ``bnaudit.inspect``,
apply the config's rule settings, set aside the findings a baseline accepts, and decide pass or fail.

Severity overrides and layer-glob ignores are passed to ``inspect`` (which applies them) and applied once
more here: both are idempotent, and doing it here keeps the gate's verdict independent of how a rule family
builds its findings. Nothing here prints; the CLI renders the ``CheckResult``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bnaudit.errors import BnauditError, UsageError
from bnaudit.findings import Finding, Report, fails, severity_counts, sort_findings
from bnaudit.gate.baseline import Baseline, load_baseline
from bnaudit.gate.schema import SPEC_KEYS, AuditSpec, Config


@dataclass(frozen=True)
class CheckResult:
    """What one ``bnaudit check`` run found.

    Attributes:
        config: the config the run used (command-line overrides applied).
        reports: one Report per audit, holding only the findings the baseline does not accept.
        accepted: findings the baseline accepts (not counted against the gate).
        stale: baseline entries that matched no finding (fixed since the baseline was written).
        raw_reports: the reports before the baseline was applied (what ``--write-baseline`` records).
    """

    config: Config
    reports: tuple[Report, ...]
    accepted: tuple[Finding, ...] = ()
    stale: int = 0
    raw_reports: tuple[Report, ...] = field(default=())

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Every new finding of every audit, sorted."""
        return sort_findings(f for r in self.reports for f in r.findings)

    @property
    def failed(self) -> bool:
        """True when a new finding is at or above ``config.fail_on``."""
        return fails(self.findings, self.config.fail_on)

    @property
    def exit_code(self) -> int:
        """0 when the gate passes, 1 when it fails (errors in the input raise instead: exit 2)."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """One line for the end of the log, e.g. ``bnaudit check: 2 audits, 1 error, 3 warnings (...) -> FAILED``."""
        counts = severity_counts(self.findings)
        parts = [f"{counts[s]} {s}{'s' if counts[s] != 1 else ''}" for s in ("error", "warning", "info")]
        extra = []
        if self.accepted:
            extra.append(f"{len(self.accepted)} accepted by the baseline")
        if self.stale:
            extra.append(f"{self.stale} baseline entr{'ies' if self.stale != 1 else 'y'} no longer found")
        tail = f" ({'; '.join(extra)})" if extra else ""
        n = len(self.reports)
        verdict = "FAILED" if self.failed else "passed"
        return (f"bnaudit check: {n} audit{'s' if n != 1 else ''}, {', '.join(parts)}{tail}; "
                f"fail_on={self.config.fail_on}: {verdict}")


def apply_rule_config(findings: Sequence[Finding], rule_config: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Configured severities and layer-glob ignores applied to findings.

    Args:
        findings: findings of one audit.
        rule_config: code -> {"severity": str|None, "ignore": [layer globs], ...}.

    Returns:
        The findings that are not ignored, with their configured severity.
    """
    out = []
    for f in findings:
        settings = rule_config.get(f.code) or {}
        globs = settings.get("ignore") or ()
        if f.layer is not None and any(fnmatch.fnmatchcase(f.layer, g) for g in globs):
            continue
        severity = settings.get("severity")
        out.append(f.with_severity(severity) if severity and severity != f.severity else f)
    return out


def run_checks(
    config: Config,
    *,
    baseline: Baseline | Path | str | None = None,
    use_baseline: bool = True,
    inspect: Callable[..., Report],
) -> CheckResult:
    """Run every audit in ``config`` and judge the findings.

    Args:
        config: a validated config (``bnaudit.gate.load_config`` plus ``Config.override`` for flags).
        baseline: a Baseline or baseline file; default: the config's ``baseline:``.
        use_baseline: False ignores any baseline (used when writing a new one).
        inspect: the audit function, ``bnaudit.inspect`` or one that honours its keyword arguments (the gate
            sits below the API layer, so the API passes it in: ``bnaudit.run_checks`` and ``bnaudit.check``).

    Returns:
        A CheckResult; ``result.exit_code`` is the gate's verdict.

    Raises:
        UsageError: the config has no audits.
        SpecError, WeightsError, DataError, ConfigError: an audit's input is unusable; the message is
            prefixed with the audit's name.
    """
    if not config.audits:
        where = f" in {config.path}" if config.path else ""
        raise UsageError(f"no audits{where}; add one under audits: (e.g. `- model: model.py:build_model`)")
    select, ignore = config.selection()
    rule_config = config.rule_config()
    raw: list[Report] = []
    for audit in config.audits:
        try:
            report = inspect(
                audit.model,
                audit.data,
                predict=audit.predict,
                weights=audit.weights,
                trust_pickle=audit.trust_pickle,
                select=select or None,
                ignore=ignore or None,
                rule_config=rule_config,
                input_shape=audit.input_shape,
                input_key=audit.input_key,
                batch_size=audit.batch_size,
                steps=audit.steps,
                device=audit.device,
                name=audit.name,
            )
        except BnauditError as exc:
            # Same error class (same exit status), but the user learns which audit broke and which line of the
            # config to fix, as for a schema error (a missing model file is only found when the audit runs).
            where = audit.where(_culprit(audit, str(exc)))
            raise type(exc)(f"{where + ': ' if where else ''}audit {audit.name!r}: {exc}") from exc
        findings = [replace(f, audit=audit.name) for f in apply_rule_config(report.findings, rule_config)]
        meta = {**dict(report.meta), "audit": audit.name}
        raw.append(replace(report, findings=sort_findings(findings), meta=meta))

    if use_baseline and baseline is None and config.baseline is not None:
        baseline = config.baseline
    if not use_baseline or baseline is None:
        return CheckResult(config, tuple(raw), raw_reports=tuple(raw))
    if not isinstance(baseline, Baseline):
        baseline = load_baseline(baseline)
    everything = [f for r in raw for f in r.findings]
    new, accepted, stale = baseline.split(everything)
    new_ids = {id(f) for f in new}
    reports = tuple(replace(r, findings=tuple(f for f in r.findings if id(f) in new_ids)) for r in raw)
    return CheckResult(config, reports, sort_findings(accepted), stale, tuple(raw))


def _culprit(audit: AuditSpec, message: str) -> str | None:
    """The spec key an input error is about: the loaders name the spec they could not use, so it is the
    longest of the audit's specs the message mentions (``m.py:build_data`` over ``m.py``), if any."""
    named = [(len(value), key) for key in SPEC_KEYS if (value := getattr(audit, key)) and value in message]
    return max(named)[1] if named else None


__all__ = ["CheckResult", "apply_rule_config", "run_checks"]
