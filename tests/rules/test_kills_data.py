"""Edge cases of the BN2xx rules (rules/data.py) and the data probe (probes/data.py) that the mutation check
(`tools/mutation.py`, `docs/mutation.md`) found unpinned: each test decides a behaviour that a plausible one-token
change would alter (a threshold at its edge, an evidence value against a naive recomputation, an edge path). Real
small models, real or exactly constructed data."""

from __future__ import annotations
