"""The checkpoint fixes: BN302 and BN303 (running statistics that do not fit the data, or were never
estimated) and BN209 (NaN/Inf in BatchNorm buffers) are repaired by re-estimating the running statistics on
the data, as ``bnaudit recalibrate`` does; the re-audit then checks that each finding is gone, and a
recalibration that does not remove them is not kept. BN305 (frozen BatchNorm weights whose statistics still
move) changes the architecture (FrozenBatchNorm), which a plain state_dict cannot carry: it is listed with
the command that does it, ``bnaudit swap-norm --to frozen``."""

from __future__ import annotations

from typing import Any

from bnaudit.findings import Report
from bnaudit.fixing.catalog import fix_kind

__all__ = ["repair_checkpoint"]

_RECALIBRATE = ("BN302", "BN303", "BN209")


def repair_checkpoint(
    ws: Any, text: str, state: dict[str, Any], after: Report, *, data: Any, enabled: bool, batch_size: int,
    input_key: str | None, notes: list[str],
) -> tuple[dict[str, Any], Report, list[Any]]:
    """Repair the checkpoint findings ``after`` still reports, on a copy of ``state``.

    Args:
        ws: the fix's workspace (loads and audits the edited source with a state).
        text: the edited source.
        state: the checkpoint fitted to it.
        after: the audit of ``text`` with ``state``.
        data: the DATA the audit used (None: the file's build_data).
        enabled: an output was given (otherwise every checkpoint finding is skipped).
        batch_size, input_key: as for the audit.
        notes: receives one line per change to the checkpoint.

    Returns:
        (the state, the audit of it, one FixOutcome per checkpoint finding).
    """
    from bnaudit.fixing.engine import APPLIED, NOT_FIXABLE, ROLLED_BACK, SKIPPED, FixOutcome

    targets = [f for f in after.findings if fix_kind(f.code) == "checkpoint"]

    def outcome(f: Any, status: str, detail: str) -> FixOutcome:
        return FixOutcome(f.code, f.layer, after.source_lines.get(f.layer or "\0"), "checkpoint", status, detail)

    if not targets:
        return state, after, []
    if not enabled:
        return state, after, [outcome(f, SKIPPED, "give -o OUT to write a fixed checkpoint") for f in targets]
    out = [outcome(f, NOT_FIXABLE, "it changes the architecture: run `bnaudit swap-norm MODEL --to frozen -o OUT`")
           for f in targets if f.code == "BN305"]
    recal = [f for f in targets if f.code in _RECALIBRATE]
    if not recal:
        return state, after, out
    from bnaudit.api import load_data
    from bnaudit.fixing.checkpoint import recalibrated

    loaded = ws.load(text, state)
    source = load_data(data, namespace=loaded.namespace, batch_size=batch_size, input_key=input_key)
    if source is None:
        return state, after, out + [outcome(f, SKIPPED, "recalibrating needs --data") for f in recal]
    new_state = recalibrated(loaded.module, source, batch_size=batch_size, input_key=input_key)
    report = ws.audit(text, new_state)
    left = {(f.code, f.layer) for f in report.findings}
    if any((f.code, f.layer) in left for f in recal):
        return state, after, out + [
            outcome(f, ROLLED_BACK if (f.code, f.layer) in left else NOT_FIXABLE,
                    "recalibrating on the data did not remove every finding, so it was not kept")
            for f in recal
        ]
    notes.append(f"re-estimated the BatchNorm running statistics on {source.spec}")
    return new_state, report, out + [outcome(f, APPLIED, "running statistics recalibrated on the data") for f in recal]
