"""The complete rule catalogue: imports every rule family so that the registry is full, and answers the
questions that need all of it: every rule, one rule by code or name, and a ``--select``/``--ignore`` selection.
A new family module is added to the imports here. ``base`` holds the machinery and never imports this module,
so the families can import ``base`` without a circle."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from bnaudit.errors import UsageError

# Importing a family module runs its @register decorators.
from bnaudit.rules import (  # noqa: F401
    architecture,
    data,
    distributed,
    layer_settings,
    modes,
    running_stats,
)
from bnaudit.rules.base import Rule, find_registered, matches, registered_rules

__all__ = ["all_rules", "get_rule", "matches", "select_rules", "validate_patterns"]


def all_rules() -> list[type[Rule]]:
    """Every rule, ordered by code."""
    return registered_rules()


def get_rule(code_or_name: str) -> type[Rule]:
    """Look a rule up by code (``BN101``, any case) or name (``redundant-bias``).

    Raises:
        UsageError: no such rule; the message suggests the closest code or name.
    """
    rule = find_registered(code_or_name)
    if rule is None:
        rules = all_rules()
        hint = _did_you_mean(code_or_name.strip(), [*(r.code for r in rules), *(r.name for r in rules)])
        raise UsageError(f"no rule {code_or_name!r}{hint}; `bnaudit rules` lists them")
    return rule


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_patterns(patterns: Iterable[str], what: str) -> list[str]:
    """Reject a --select/--ignore entry that selects no rule, so a typo never silently disables a gate.

    Raises:
        UsageError: a pattern that matches no registered code or name.
    """
    rules = all_rules()
    out = []
    for pattern in patterns:
        p = pattern.strip()
        if not p:
            continue
        if not any(matches(r.code, r.name, [p]) for r in rules):
            hint = _did_you_mean(p, [*(r.code for r in rules), *(r.name for r in rules)])
            raise UsageError(f"{what} {p!r} matches no rule{hint}; `bnaudit rules` lists them")
        out.append(p)
    return out


def select_rules(select: Iterable[str] | None = None, ignore: Iterable[str] | None = None) -> list[type[Rule]]:
    """Rules chosen by ``select`` (default: all) minus ``ignore``; both take codes, prefixes or names."""
    select = validate_patterns(select or [], "--select")
    ignore = validate_patterns(ignore or [], "--ignore")
    chosen = []
    for rule in all_rules():
        if select and not matches(rule.code, rule.name, select):
            continue
        if ignore and matches(rule.code, rule.name, ignore):
            continue
        chosen.append(rule)
    return chosen
