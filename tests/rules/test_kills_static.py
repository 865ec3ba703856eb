"""Edge cases of the BN1xx rules (rules/architecture.py, rules/layer_settings.py) and the rule machinery
(rules/base.py, rules/catalog.py, rules/common.py) that the mutation check (`tools/mutation.py`,
`docs/mutation.md`) found unpinned: each test decides a behaviour that a plausible one-token change would alter (a
threshold at its edge, an evidence value against a naive recomputation, an edge path). Real small models, real or
exactly constructed data."""

from __future__ import annotations
