"""``bnaudit fix``: apply the fixes the findings recommend, in the model's source (LibCST edits of the
constructor calls the findings point at) and in a copy of its checkpoint, re-auditing the result.

``fix`` is the API function (``bnaudit.fix``); ``fix_kind(code)`` says whether a rule's findings have a
safe, an unsafe or a checkpoint fix (what ``bnaudit rules`` shows). The LibCST parts are imported only when a
fix runs, so ``fix_kind`` works without libcst installed."""

from __future__ import annotations

from typing import Any

from bnaudit.fixing.catalog import FixInfo, fix_info, fix_kind, fixable_codes

__all__ = ["FixInfo", "fix", "fix_info", "fix_kind", "fixable_codes"]


def fix(model: Any, data: Any = None, *, inspect: Any, **options: Any) -> Any:
    """Audit MODEL with ``inspect`` (``bnaudit.inspect``), fix its source (and checkpoint) and re-audit; see
    ``bnaudit.fixing.engine.fix``. ``bnaudit.fix`` is this with ``bnaudit.inspect`` passed in.

    Raises:
        UsageError: libcst is not installed (``pip install 'bnaudit[fix]'``), or as ``engine.fix``.
    """
    try:
        import libcst  # noqa: F401
    except ImportError:
        from bnaudit.errors import UsageError

        raise UsageError("bnaudit fix needs LibCST: pip install 'bnaudit[fix]'") from None
    from bnaudit.fixing.engine import fix as run

    return run(model, data, inspect=inspect, **options)
