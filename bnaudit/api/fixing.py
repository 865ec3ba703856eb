"""``bnaudit.fix``: the fixing engine with ``bnaudit.inspect`` as its audit (the engine sits below the API)."""

from __future__ import annotations

from typing import Any


def fix(model: Any, data: Any = None, **options: Any) -> Any:
    """Audit MODEL, fix what can be fixed in its source file (and checkpoint), and re-audit the result.

    Takes ``bnaudit.fixing.engine.fix``'s options (``unsafe_fixes``, ``diff``, ``output``, ``force`` and
    ``bnaudit.inspect``'s audit options) and returns its FixResult; see docs/fix.md.
    """
    from bnaudit import fixing
    from bnaudit.api.inspection import inspect

    return fixing.fix(model, data, inspect=inspect, **options)
