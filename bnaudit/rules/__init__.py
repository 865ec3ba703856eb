"""Rules: the registry (``base``) and one module per family: architecture (BN1xx), data (BN2xx),
modes (BN3xx), distributed (BN4xx). ``catalog`` imports every family so the registry is complete."""

from bnaudit.rules.base import Example, Rule, all_rules, get_rule, register, select_rules

__all__ = ["Example", "Rule", "all_rules", "get_rule", "register", "select_rules"]
