"""Every registered rule's own cases: each ``invalid`` example must make it fire (on the named layer), each
``valid`` example must not. New rules are covered as soon as they register."""

from __future__ import annotations

import pytest
import torch

import bnaudit
from bnaudit.rules import all_rules

CASES = [
    pytest.param(rule, kind, i, example, id=f"{rule.code}-{kind}-{i}")
    for rule in all_rules()
    for kind, examples in (("invalid", rule.invalid), ("valid", rule.valid))
    for i, example in enumerate(examples)
]


def test_every_rule_has_cases():
    for rule in all_rules():
        assert rule.invalid, f"{rule.code} has no invalid example"
        assert rule.valid, f"{rule.code} has no valid example"
        assert rule.doc().strip(), f"{rule.code} has no documentation"


@pytest.mark.parametrize(("rule", "kind", "index", "example"), CASES)
def test_rule_example(rule, kind, index, example):
    if "distributed" in rule.requires and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        pytest.skip("needs a torch.distributed process group; run with 2 ranks in tests/distributed/")
    torch.manual_seed(0)
    extra = dict(example.context()) if example.context else {}
    report = bnaudit.inspect(
        example.model(),
        example.data() if example.data else None,
        predict=example.predict,
        select=[rule.code],
        rule_config={rule.code: {"options": dict(example.options)}} if example.options else None,
        **extra,
    )
    assert rule.code not in report.rules_skipped, report.rules_skipped
    hits = [f for f in report.findings if f.code == rule.code]
    if kind == "invalid":
        assert hits, f"{rule.code} did not fire on: {example.note or example.model}"
        if example.layer is not None:
            assert example.layer in {f.layer for f in hits}, [f.layer for f in hits]
        for f in hits:
            assert f.fix and f.message and f.name == rule.name
    else:
        assert not hits, [f.message for f in hits]
