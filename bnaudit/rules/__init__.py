"""Rules: the machinery (``base``: Rule, Example, @register), the complete catalogue (``catalog``: all_rules,
get_rule, select_rules) and one module per family: architecture (BN1xx), data (BN2xx), modes (BN3xx),
distributed (BN4xx). Importing this package stays cheap: the families (and torch) load with ``catalog``."""

from bnaudit.rules.base import Example, Rule, register

__all__ = ["Example", "Rule", "register"]
