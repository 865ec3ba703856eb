"""Edge cases of the BN3xx rules (rules/modes.py, rules/running_stats.py) and their probes (probes/running_stats.py,
probes/common.py, probes/state.py) that the mutation check (`tools/mutation.py`, `docs/mutation.md`) found
unpinned: each test decides a behaviour that a plausible one-token change would alter (a threshold at its edge, an
evidence value against a naive recomputation, an edge path). Real small models, real or exactly constructed data."""

from __future__ import annotations
