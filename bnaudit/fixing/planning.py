"""From findings to edits: which finding becomes which ``SourceEdit``, and which cannot be fixed automatically
and why. Only the report is read here (findings, their evidence, ``source_lines`` and the layer types), so
the plan is exactly what the audit saw; nothing is guessed from names."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bnaudit.findings import Finding, Report
from bnaudit.fixing.catalog import fix_info
from bnaudit.fixing.source import SourceEdit, Unfixable

__all__ = ["Planned", "plan_source_edits", "sequential_index"]


@dataclass(frozen=True)
class Planned:
    """A finding and what will be done about it: an edit, or the reason there is none."""

    finding: Finding
    kind: str
    line: int | None
    edit: SourceEdit | None = None
    reason: str = ""
    status: str = ""  # "" (planned), "not-fixable" or "skipped"


def sequential_index(layer: str) -> tuple[str, int] | None:
    """``features.3`` -> (``features``, 3); None when the last part is not an index."""
    parent, _, last = layer.rpartition(".")
    return (parent, int(last)) if last.isdigit() else None


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _edit(f: Finding, line: int, callee: str, report: Report, types: Mapping[str, str]) -> SourceEdit:
    ev = f.evidence
    layer = f.layer or ""
    if f.code == "BN101":
        return SourceEdit(f.code, layer, line, callee, "set", "bias", "False", True,
                          description="bias=False (the BatchNorm's beta is the shift)")
    if f.code == "BN106":
        m = float(ev["momentum"])
        if not 0 < m < 1 or m <= float(ev.get("max_momentum", 0.5)):
            raise Unfixable(f"momentum={m:g} has no Keras reading; choose the momentum by hand (0.1 is the default)")
        return SourceEdit(f.code, layer, line, callee, "set", "momentum", _fmt(1 - m), m,
                          description=f"momentum={m:g} -> {_fmt(1 - m)} (PyTorch momentum = 1 - Keras momentum)")
    if f.code == "BN108":
        eps, new = float(ev["eps"]), float(ev["min_eps"])
        return SourceEdit(f.code, layer, line, callee, "set", "eps", _fmt(new), eps,
                          description=f"eps={eps:g} -> {_fmt(new)} (smallest safe for {ev.get('dtype', 'half precision')})")
    if f.code == "BN107":
        return SourceEdit(f.code, layer, line, callee, "set", "track_running_stats", "True", False,
                          description="track_running_stats=True (a checkpoint then needs `bnaudit recalibrate`)")
    if f.code == "BN103":
        return SourceEdit(f.code, layer, line, callee, "identity",
                          description=f"{callee}(...) -> Identity() (the output is no longer normalized)")
    if f.code == "BN104":
        return _move_edit(f, line, callee, report, types)
    if f.code == "BN105":
        attr = layer.rpartition(".")[2]
        calls = int(ev.get("calls", 0))
        if not attr.isidentifier() or calls < 2:
            raise Unfixable("the BatchNorm is not an attribute of its module")
        return SourceEdit(f.code, layer, line, callee, "per-call", attr, expect=calls,
                          description=f"one {callee} per loop step: nn.ModuleList of {calls}, self.{attr}[t] in the loop")
    raise Unfixable("bnaudit has no source fix for this rule")


def _move_edit(f: Finding, line: int, callee: str, report: Report, types: Mapping[str, str]) -> SourceEdit:
    dropout = str(f.evidence.get("dropout", ""))
    if dropout.startswith("F.") or not f.layer:
        raise Unfixable(f"the dropout is the function call {dropout}, not a module in an nn.Sequential")
    here = sequential_index(f.layer)
    bns = list(f.evidence.get("batchnorms") or [])
    places = [sequential_index(b) for b in bns]
    if here is None or not bns or any(p is None or p[0] != here[0] for p in places):
        raise Unfixable("the dropout and every BatchNorm it feeds must be elements of one nn.Sequential")
    target = max(bns, key=lambda b: sequential_index(b)[1])  # type: ignore[index]
    target_line = report.source_lines.get(target)
    if target_line is None or target not in types:
        raise Unfixable(f"{target} has no source line")
    return SourceEdit(f.code, f.layer, line, callee, "move", after_line=target_line, after_callee=types[target],
                      after_layer=target,
                      description=f"moved after {target} (the last BatchNorm it fed)")


def plan_source_edits(report: Report, *, unsafe_fixes: bool, codes: Iterable[str] | None = None) -> list[Planned]:
    """One Planned per finding that has a source fix (``safe`` or ``unsafe``).

    Args:
        report: the audit of the model's file (its ``source_lines`` map layers to lines).
        unsafe_fixes: plan unsafe fixes too; otherwise they are listed as skipped.
        codes: only these rule codes (default: every rule with a source fix).
    """
    types = {layer.name: layer.type for layer in report.layers}
    shared = Counter((report.source_lines.get(n), t) for n, t in types.items())
    wanted = set(codes) if codes is not None else None
    out: list[Planned] = []
    for f in report.findings:
        info = fix_info(f.code)
        if info is None or info.kind == "checkpoint" or (wanted is not None and f.code not in wanted):
            continue
        line = report.source_lines.get(f.layer or "\0")
        if info.kind == "unsafe" and not unsafe_fixes:
            out.append(Planned(f, info.kind, line, reason=f"unsafe ({info.why_unsafe}); pass --unsafe-fixes",
                               status="skipped"))
            continue
        try:
            if f.layer is None or line is None:
                raise Unfixable("the layer has no source line in the model's file")
            callee = types.get(f.layer)
            if callee is None:
                raise Unfixable("the layer is not a leaf module of the model's graph")
            count = shared[(line, callee)]
            if count > 1:
                raise Unfixable(f"{count} {callee} layers are built by this one line (a helper or a loop)")
            out.append(Planned(f, info.kind, line, _edit(f, line, callee, report, types)))
        except Unfixable as exc:
            out.append(Planned(f, info.kind, line, reason=str(exc), status="not-fixable"))
    return _drop_conflicts(out)


def _drop_conflicts(planned: list[Planned]) -> list[Planned]:
    """A bias feeding a BatchNorm that another fix removes is needed after all: its BN101 fix is refused."""
    removed = {p.finding.layer for p in planned if p.edit is not None and p.edit.op == "identity"}
    out = []
    for p in planned:
        feeds = set(p.finding.evidence.get("feeds") or []) if p.finding.code == "BN101" else set()
        if p.edit is not None and feeds & removed:
            p = Planned(p.finding, p.kind, p.line, reason=f"{', '.join(sorted(feeds & removed))} is removed by the "
                        "BN103 fix, so this bias is no longer redundant", status="not-fixable")
        out.append(p)
    return out
