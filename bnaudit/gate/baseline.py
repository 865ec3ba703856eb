"""Baselines: the findings a team has accepted, so that the CI gate fails only on new ones.

A baseline is a small JSON file listing findings by the three things that identify them across runs: the
rule code, the audit, and the layer. Messages are kept for the reader but never compared, so rewording a rule's
message or a measured number drifting does not make an accepted finding "new". Matching counts duplicates: if
the baseline accepts one BN203 on ``features.0`` and a run produces two, one of them is new."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnaudit.errors import ConfigError, UsageError
from bnaudit.files import read_text_capped
from bnaudit.findings import Finding, Report

BASELINE_VERSION = 1
MAX_BASELINE_BYTES = 64 << 20  # a baseline lists findings: tens of thousands fit in a few MiB
Key = tuple[str, str, str]


def finding_key(finding: Finding) -> Key:
    """The identity of a finding across runs: (code, audit, layer); model-wide findings use ``""``."""
    return (finding.code, finding.audit or "", finding.layer or "")


@dataclass(frozen=True)
class Baseline:
    """Accepted findings, as a multiset of keys.

    Attributes:
        entries: one ``(code, audit, layer)`` per accepted finding (repeated when accepted more than once).
        path: the file it came from, if any.
    """

    entries: tuple[Key, ...] = ()
    path: Path | None = None

    @classmethod
    def from_reports(cls, reports: Iterable[Report]) -> Baseline:
        return cls(tuple(sorted(finding_key(f) for r in reports for f in r.findings)))

    def split(self, findings: Sequence[Finding]) -> tuple[list[Finding], list[Finding], int]:
        """Separate ``findings`` into new ones and accepted ones.

        Returns:
            ``(new, accepted, stale)``: findings not covered by the baseline, findings it covers, and how many
            baseline entries matched nothing (fixed since the baseline was written).
        """
        budget = Counter(self.entries)
        new, accepted = [], []
        for f in findings:
            key = finding_key(f)
            if budget[key] > 0:
                budget[key] -= 1
                accepted.append(f)
            else:
                new.append(f)
        return new, accepted, sum(budget.values())


def render_baseline(reports: Iterable[Report]) -> str:
    """The baseline file's text for the findings in ``reports`` (sorted, so reruns give identical files)."""
    from bnaudit import __version__

    rows = sorted(
        ({"code": f.code, "audit": f.audit or "", "layer": f.layer or "", "message": f.message}
         for r in reports for f in r.findings),
        key=lambda d: (d["audit"], d["code"], d["layer"], d["message"]),
    )
    doc = {"bnaudit_baseline": BASELINE_VERSION, "generated_by": f"bnaudit {__version__}", "findings": rows}
    return json.dumps(doc, indent=2) + "\n"


def load_baseline(path: Path | str) -> Baseline:
    """Read a baseline file written by ``bnaudit check --write-baseline``.

    Raises:
        UsageError: the file does not exist.
        ConfigError: it is not a bnaudit baseline (bad JSON, wrong version, malformed entries).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"baseline {p} not found; create it with `bnaudit check --write-baseline {p}`")
    try:
        doc = json.loads(read_text_capped(p, limit=MAX_BASELINE_BYTES, what="baseline"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: not a bnaudit baseline ({exc}); rewrite it with --write-baseline") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(doc, dict) or doc.get("bnaudit_baseline") != BASELINE_VERSION:
        raise ConfigError(f"{p}: not a version-{BASELINE_VERSION} bnaudit baseline; rewrite it with --write-baseline")
    rows = doc.get("findings")
    if not isinstance(rows, list):
        raise ConfigError(f"{p}: 'findings' must be a list; rewrite it with --write-baseline")
    entries = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("code"), str):
            raise ConfigError(f"{p}: findings[{i}] needs a 'code'; rewrite it with --write-baseline")
        audit, layer = row.get("audit") or "", row.get("layer") or ""
        if not isinstance(audit, str) or not isinstance(layer, str):
            raise ConfigError(f"{p}: findings[{i}] 'audit' and 'layer' must be strings")
        entries.append((row["code"], audit, layer))
    return Baseline(tuple(entries), p)


__all__ = ["Baseline", "finding_key", "load_baseline", "render_baseline"]
