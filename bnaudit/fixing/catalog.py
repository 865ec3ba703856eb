"""Which findings ``bnaudit fix`` can repair, and how: the rule code -> fix kind mapping that ``bnaudit rules``
shows in its Fix column and the generated rule documentation reads.

A **safe** fix keeps the model's function (eval outputs equal to float tolerance, training unchanged) and is
applied by default. An **unsafe** fix changes behaviour the way the finding recommends, and is applied only
with ``--unsafe-fixes``; each says why it is unsafe. A **checkpoint** fix rewrites a copy of the weights (given
with ``--weights`` or as a bnaudit ``.pt``) and is written only to ``-o OUT``. No torch here: the CLI's rule
table reads this without loading a model."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FIX_KINDS", "FixInfo", "fix_info", "fix_kind", "fixable_codes"]

FIX_KINDS = ("safe", "unsafe", "checkpoint")


@dataclass(frozen=True)
class FixInfo:
    """How one rule's findings are fixed.

    Attributes:
        code: the rule code.
        kind: ``safe``, ``unsafe`` or ``checkpoint``.
        action: what the fix does, in a few words.
        why_unsafe: for an unsafe fix, how it changes behaviour (empty for the others).
    """

    code: str
    kind: str
    action: str
    why_unsafe: str = ""


_CATALOG = {
    info.code: info
    for info in (
        FixInfo("BN101", "safe", "bias=False on the Linear/Conv (with --weights: the bias folded into the BatchNorm's "
                "running_mean)"),
        FixInfo("BN106", "safe", "a Keras-convention momentum m becomes 1 - m"),
        FixInfo("BN108", "safe", "eps raised to the smallest value safe for the dtype"),
        FixInfo("BN103", "unsafe", "the BatchNorm on the output becomes nn.Identity()",
                "the model's outputs are no longer normalized: its scale and the loss it trains to change"),
        FixInfo("BN104", "unsafe", "the Dropout moves after the last BatchNorm it feeds (nn.Sequential literals only)",
                "the regularization acts at another depth, and the Sequential's later indices (checkpoint keys) shift"),
        FixInfo("BN105", "unsafe", "one BatchNorm per loop step: an nn.ModuleList created in __init__, indexed by "
                "the loop variable", "each step then keeps its own statistics and learns its own scale and shift; the "
                "checkpoint's one set of entries is copied to every step"),
        FixInfo("BN107", "unsafe", "track_running_stats=True",
                "eval mode then uses running statistics, which a checkpoint lacks until `bnaudit recalibrate` fills "
                "them"),
        FixInfo("BN302", "checkpoint", "running statistics recalibrated on --data"),
        FixInfo("BN303", "checkpoint", "running statistics recalibrated on --data"),
        FixInfo("BN305", "checkpoint", "the reported BatchNorm layers become FrozenBatchNorm (as `swap-norm --to "
                "frozen`); OUT is then a bnaudit model file"),
        FixInfo("BN209", "checkpoint", "NaN/Inf BatchNorm buffers re-estimated on --data"),
    )
}


def fix_info(code: str) -> FixInfo | None:
    """The fix for findings of rule ``code``, or None when bnaudit cannot apply one."""
    return _CATALOG.get(code)


def fix_kind(code: str) -> str | None:
    """``safe``, ``unsafe``, ``checkpoint``, or None (no automatic fix) for rule ``code``."""
    info = _CATALOG.get(code)
    return info.kind if info else None


def fixable_codes(kind: str | None = None) -> tuple[str, ...]:
    """Rule codes with a fix (of ``kind`` when given), sorted."""
    return tuple(sorted(c for c, info in _CATALOG.items() if kind is None or info.kind == kind))
