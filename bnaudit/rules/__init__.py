"""Rules: the machinery (``base``: Rule, Example, @register), the complete catalogue (``catalog``: all_rules,
get_rule, select_rules, validate_patterns) and one module per family: architecture (BN1xx), data (BN2xx),
modes (BN3xx), distributed (BN4xx).

The catalogue's functions are also reachable here (``from bnaudit.rules import all_rules``); they load the
catalogue, and with it every family and torch, on first use, so importing ``bnaudit.rules.base`` stays cheap."""

from typing import Any

from bnaudit.rules.base import Example, Rule, register

_CATALOGUE = ("all_rules", "get_rule", "select_rules", "validate_patterns")


def __getattr__(name: str) -> Any:
    if name in _CATALOGUE:
        from bnaudit.rules import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module 'bnaudit.rules' has no attribute {name!r}")


__all__ = ["Example", "Rule", "register", *_CATALOGUE]
