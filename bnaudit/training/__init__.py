"""train-compare: the controlled experiment with and without normalization.

``train_compare(model, data, ...)`` trains each variant (baseline, bn, groupnorm, layernorm, user) at every
learning rate, batch size and seed from identical initial weights and identical batch order, and returns a
:class:`CompareResult` with every run's curves, per-cell mean ± std across seeds, and a verdict in words.
Modules: ``data`` (in-memory data, split, batch order), ``losses`` (loss auto, target), ``variants``
(building each variant from the seed's base model), ``measure`` (gradient norms, Fig. 1 percentiles, ICS),
``recorder`` (activation drift via bnaudit.record), ``run`` (one training run), ``compare`` (the sweep), ``ddp`` (runs under DistributedDataParallel), ``results`` and ``verdict``."""

from bnaudit.training.compare import DEFAULT_LRS, DEFAULT_STEPS, OPTIMIZERS, train_compare
from bnaudit.training.results import CellSummary, CompareResult, RunResult, Stat
from bnaudit.training.run import Progress
from bnaudit.training.variants import VARIANTS

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_STEPS",
    "OPTIMIZERS",
    "VARIANTS",
    "CellSummary",
    "CompareResult",
    "Progress",
    "RunResult",
    "Stat",
    "train_compare",
]
