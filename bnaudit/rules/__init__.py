"""Rules: the machinery (``base``: Rule, Example, @register), the complete catalogue (``catalog``: all_rules,
get_rule, select_rules, validate_patterns) and the rule modules of each family: BN1xx ``architecture`` (wiring)
and ``layer_settings`` (momentum, eps, axis), BN2xx ``data``, BN3xx ``modes`` (eval mode) and
``running_stats``, BN4xx ``distributed``. ``common`` holds helpers they share. The rules' example factories
(small models and data, the cases every rule must and must not fire on) live in ``examples`` (shared data) and
``examples_<family>``.

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
