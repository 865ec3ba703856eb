"""What ``bnaudit.fix`` returns: one FixOutcome per fixable finding, and the FixResult with the diff and the
audits before and after."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnaudit.findings import Finding, Report

__all__ = ["APPLIED", "NOT_FIXABLE", "ROLLED_BACK", "SKIPPED", "FixOutcome", "FixResult", "layer_key"]

APPLIED, ROLLED_BACK, NOT_FIXABLE, SKIPPED = "applied", "rolled-back", "not-fixable", "skipped"


def layer_key(finding: Finding) -> tuple[str, str | None]:
    return (finding.code, finding.layer)


@dataclass(frozen=True)
class FixOutcome:
    """What happened to one finding.

    Attributes:
        code, layer: the finding's rule and layer.
        line: the line of its layer's constructor call in the model's file (None when unknown).
        kind: ``safe``, ``unsafe`` or ``checkpoint``.
        status: ``applied``, ``rolled-back`` (applied, but the re-audit still reported the finding),
            ``not-fixable`` (edit it by hand at ``line``) or ``skipped`` (an unsafe fix without
            ``unsafe_fixes``, a checkpoint fix without an output).
        detail: what was done, or why not.
    """

    code: str
    layer: str | None
    line: int | None
    kind: str
    status: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "layer": self.layer, "line": self.line, "kind": self.kind, "status": self.status,
                "detail": self.detail}


@dataclass
class FixResult:
    """The outcome of ``bnaudit.fix``.

    Attributes:
        path: the model's file.
        outcomes: one per fixable finding, in the report's order.
        diff: the unified diff of the model's file ("" when nothing changed).
        before: the audit before any fix.
        after: the audit of the fixed code (and checkpoint); ``before`` when nothing was applied.
        written: the files written (none with ``diff=True``).
        checkpoint_notes: what the checkpoint fix did to each entry it dropped, added or re-estimated.
    """

    path: Path
    outcomes: list[FixOutcome]
    diff: str
    before: Report
    after: Report
    written: list[Path] = field(default_factory=list)
    checkpoint_notes: list[str] = field(default_factory=list)
    renames: Mapping[str, str] = field(default_factory=dict)

    @property
    def applied(self) -> list[FixOutcome]:
        return [o for o in self.outcomes if o.status == APPLIED]

    def _rename(self, layer: str | None) -> str | None:
        return self.renames.get(layer, layer) if layer is not None else None

    @property
    def gone(self) -> list[Finding]:
        """Findings of ``before`` that the re-audit no longer reports."""
        after = {layer_key(f) for f in self.after.findings}
        return [f for f in self.before.findings if (f.code, self._rename(f.layer)) not in after]

    @property
    def new(self) -> list[Finding]:
        """Findings the re-audit reports that ``before`` did not."""
        before = {(f.code, self._rename(f.layer)) for f in self.before.findings}
        return [f for f in self.after.findings if layer_key(f) not in before]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "outcomes": [o.to_dict() for o in self.outcomes],
            "diff": self.diff,
            "written": [str(p) for p in self.written],
            "gone": [f.to_dict() for f in self.gone],
            "new": [f.to_dict() for f in self.new],
            "checkpoint_notes": list(self.checkpoint_notes),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }
