"""The checkpoint fixes: BN302 and BN303 (running statistics that do not fit the data, or were never
estimated) and BN209 (NaN/Inf in BatchNorm buffers) are repaired by re-estimating the running statistics on
the data, as ``bnaudit recalibrate`` does; the re-audit then checks that each finding is gone, and a
recalibration that does not remove them is not kept. BN305 (frozen BatchNorm weights whose statistics still
move) is fixed as ``bnaudit swap-norm --to frozen`` does, for the reported layers only: they become
FrozenBatchNorm, which a plain state_dict cannot describe, so the output is then a bnaudit model file (the
fixed source plus the replayable swap), loadable with ``bnaudit.load_model`` or any bnaudit command."""

from __future__ import annotations

from typing import Any

from bnaudit.findings import Report
from bnaudit.fixing.catalog import fix_kind

__all__ = ["repair_checkpoint"]

_RECALIBRATE = ("BN302", "BN303", "BN209")


def repair_checkpoint(
    ws: Any, text: str, state: dict[str, Any], after: Report, *, data: Any, enabled: bool, source: str,
    batch_size: int, input_key: str | None, notes: list[str],
) -> tuple[dict[str, Any], Report, list[Any]]:
    """Repair the checkpoint findings ``after`` still reports, on a copy of ``state``.

    Args:
        ws: the fix's workspace (loads and audits the edited source with a state).
        text: the edited source.
        state: the checkpoint fitted to it.
        after: the audit of ``text`` with ``state``.
        data: the DATA the audit used (None: the file's build_data).
        enabled: an output was given (otherwise every checkpoint finding is skipped).
        source: the model spec a bnaudit model file written for BN305 rebuilds from.
        batch_size, input_key: as for the audit.
        notes: receives one line per change to the checkpoint.

    Returns:
        (the state, or a bnaudit model file's contents after a BN305 fix; the audit of it; one FixOutcome
        per checkpoint finding).
    """
    from bnaudit.fixing.results import SKIPPED, FixOutcome

    targets = [f for f in after.findings if fix_kind(f.code) == "checkpoint"]

    def outcome(f: Any, status: str, detail: str) -> FixOutcome:
        return FixOutcome(f.code, f.layer, after.source_lines.get(f.layer or "\0"), "checkpoint", status, detail)

    if not targets:
        return state, after, []
    if not enabled:
        return state, after, [outcome(f, SKIPPED, "give -o OUT to write a fixed checkpoint") for f in targets]
    out: list[FixOutcome] = []
    recal = [f for f in targets if f.code in _RECALIBRATE]
    if recal:
        state, after, done = _recalibrate(ws, text, state, after, recal, data, batch_size, input_key, notes, outcome)
        out += done
    frozen = [f for f in targets if f.code == "BN305"]
    if frozen:
        state, after, done = _freeze(ws, text, state, after, frozen, source, notes, outcome)
        out += done
    return state, after, out


def _recalibrate(ws: Any, text: str, state: dict[str, Any], after: Report, recal: list[Any], data: Any,
                 batch_size: int, input_key: str | None, notes: list[str], outcome: Any) -> tuple[Any, Report, list]:
    from bnaudit.fixing.checkpoint import recalibrated
    from bnaudit.fixing.results import APPLIED, NOT_FIXABLE, ROLLED_BACK, SKIPPED
    from bnaudit.loading import load_data

    loaded = ws.load(text, state)
    source = load_data(data, namespace=loaded.namespace, batch_size=batch_size, input_key=input_key)
    if source is None:
        return state, after, [outcome(f, SKIPPED, "recalibrating needs --data") for f in recal]
    new_state = recalibrated(loaded.module, source, batch_size=batch_size, input_key=input_key)
    report = ws.audit(text, new_state)
    left = {(f.code, f.layer) for f in report.findings}
    if any((f.code, f.layer) in left for f in recal):
        return state, after, [
            outcome(f, ROLLED_BACK if (f.code, f.layer) in left else NOT_FIXABLE,
                    "recalibrating on the data did not remove every finding, so it was not kept")
            for f in recal
        ]
    notes.append(f"re-estimated the BatchNorm running statistics on {source.spec}")
    return new_state, report, [outcome(f, APPLIED, "running statistics recalibrated on the data") for f in recal]


def _freeze(ws: Any, text: str, state: dict[str, Any], after: Report, frozen: list[Any], source: str,
            notes: list[str], outcome: Any) -> tuple[Any, Report, list]:
    """The reported layers swapped for FrozenBatchNorm (their statistics and affine values kept)."""
    from bnaudit.fixing.results import APPLIED, ROLLED_BACK
    from bnaudit.loading.plan import apply_plan, pristine_copy
    from bnaudit.transforms import swap_norm
    from bnaudit.transforms.base import TransformResult
    from bnaudit.transforms.saving import saved_dict

    model = ws.load(text, state).module
    layers = {f.layer for f in frozen}
    plan = [step for step in swap_norm(model, "frozen").plan if step["target"] in layers]
    work = apply_plan(pristine_copy(model), plan)
    own = model.state_dict()
    work.load_state_dict({k: own[k] for k in work.state_dict()}, strict=True)
    result = TransformResult("swap_norm", work, options={"to": "frozen", "groups": None}, plan=plan)
    report = ws.audit_model_file(saved_dict(result, ws.copy(text)))
    if {(f.code, f.layer) for f in report.findings} & {(f.code, f.layer) for f in frozen}:
        return state, after, [outcome(f, ROLLED_BACK, "FrozenBatchNorm did not remove the finding") for f in frozen]
    notes.append(f"swapped {', '.join(sorted(layers))} for FrozenBatchNorm: OUT is a bnaudit model file "
                 "(load it with bnaudit.load_model or any bnaudit command)")
    return saved_dict(result, source), report, [
        outcome(f, APPLIED, "FrozenBatchNorm (statistics and affine values kept, as `swap-norm --to frozen`)")
        for f in frozen
    ]
