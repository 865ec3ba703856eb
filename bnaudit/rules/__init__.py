"""Rules: the registry (``base``) and the rule modules of each family: BN1xx ``architecture`` (wiring) and
``layer_settings`` (momentum, eps, axis), BN2xx ``data``, BN3xx ``modes`` (eval mode) and ``running_stats``,
BN4xx ``distributed``. ``catalog`` imports them all so the registry is complete; ``common`` holds helpers
they share. The rules' example factories (small models and data, the cases every rule must and must not
fire on) live in ``examples`` (shared data) and ``examples_<family>``."""

from bnaudit.rules.base import Example, Rule, all_rules, get_rule, register, select_rules

__all__ = ["Example", "Rule", "all_rules", "get_rule", "register", "select_rules"]
