"""Edge cases of the inference, train/eval and eval-step probes (probes/inference.py, probes/train_eval.py,
probes/eval_steps.py) and the BN4xx rules (rules/distributed.py; these tests' names carry `bn40`, which
tools/mutation.py selects for that module) that the mutation check (`tools/mutation.py`, `docs/mutation.md`) found
unpinned: each test decides a behaviour that a plausible one-token change would alter (a threshold at its edge, an
evidence value against a naive recomputation, an edge path). Real small models, real or exactly constructed data."""

from __future__ import annotations
