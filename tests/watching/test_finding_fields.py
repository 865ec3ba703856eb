"""A Finding's optional ``step`` and ``location``: in JSON only when set (existing reports keep their shape),
and read back by ``from_dict``."""

from __future__ import annotations

from bnaudit.findings import Finding


def test_step_and_location_appear_only_when_set_and_round_trip():
    plain = Finding("BN306", "inference-mutates-stats", "error", None, "m", "f")
    assert "step" not in plain.to_dict() and "location" not in plain.to_dict()
    live = Finding("BN306", "inference-mutates-stats", "error", None, "m", "f", step=0, location="train.py:12")
    d = live.to_dict()
    assert (d["step"], d["location"]) == (0, "train.py:12")
    assert Finding.from_dict(d) == live and Finding.from_dict(plain.to_dict()) == plain
