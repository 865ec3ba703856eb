"""The rich terminal report against golden files (fixed width, no colour, seeded models).

Regenerate after an intended change with ``BNAUDIT_REGEN_GOLDEN=1 python -m pytest tests/report``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bnaudit
from bnaudit.report import render

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("BNAUDIT_REGEN_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with BNAUDIT_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("example", ["seed_mlp_bn", "keras_mlp:build_model_bn"])
def test_console_report_golden(example):
    report = bnaudit.inspect(f"examples/{example.replace(':', '.py:') if ':' in example else example + '.py'}", select=["BN1"])
    text = render(report, "rich", width=100, color=False)
    check_golden(f"inspect_{example.replace(':', '_')}.txt", text)
    for finding in report.findings:
        assert finding.code in text and finding.fix in text.replace("\n  ", " ")
