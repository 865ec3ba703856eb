"""What the edge-test files (``test_kills_*.py``, ``test_mutation_kills.py``) share: one rule run through
``bnaudit.inspect``, and seeded inputs."""

from __future__ import annotations

import torch

import bnaudit


def rule_report(code, model, data=None, options=None, **kw):
    """``bnaudit.inspect`` with rule ``code`` alone (and its ``options``), asserting that it ran: a crash of the
    rule lands in ``rules_skipped``."""
    config = {code: {"options": options}} if options else None
    report = bnaudit.inspect(model, data, select=[code], rule_config=config, **kw)
    assert code in report.rules_run, report.rules_skipped
    return report


def rule_findings(code, model, data=None, options=None, **kw) -> list:
    """The findings of rule ``code`` alone (see ``rule_report``)."""
    return [f for f in rule_report(code, model, data, options, **kw).findings if f.code == code]


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def features(n: int, f: int = 4, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``n`` samples of ``f`` standard normal features (times ``scale``), from their own seeded generator."""
    return scale * seeded_randn(n, f, seed=seed)
