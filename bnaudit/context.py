"""RuleContext: everything a rule may look at during one audit.

The audit builds it once: a private copy of the model (the user's object is never touched; probes run on
the copy and put it back after each experiment), its layer graph, the data source and predict function when
given, a recorded training history when one exists, and a cache so that probes shared by several rules (one
train-mode pass, one co-batch experiment) run once. It also says which normalization layers never run
(``unused``): BN112 reports them and every other rule skips them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bnaudit.graph import LayerGraph
    from bnaudit.loading.data import Batch, DataSource


@dataclass
class RuleContext:
    """What rules see.

    Attributes:
        model: the audit's private copy of the user's model, on ``device``, as the user gave it. A probe that
            runs train-mode passes, switches modes or touches buffers does it inside
            ``probes.state.audit_state(ctx).restoring()``, which puts the model back afterwards, so every
            rule sees the model as given.
        graph: the layer graph (dataflow, shapes, call counts).
        data: the data source, or None (rules that require ``data`` are skipped then).
        predict: the user's ``predict(model, inputs)``, or None.
        device: where the model and batches live.
        history: a recorded training history (``bnaudit.record``), or None.
        source: the model spec or class name, for messages.
        options: audit-wide settings (``steps``: how many batches probes may use, ...).
        cache: probe results shared between rules, keyed by probe name.
        output_layers: the layers whose output the model returns, where the caller found them (``inspect``
            from the layer graph, ``bnaudit watch`` at run time); the drift rule (BN206) passes over them: a
            classifier's logits move as it learns. Empty when unknown.
    """

    model: nn.Module
    graph: LayerGraph
    device: torch.device
    data: DataSource | None = None
    predict: Callable[[nn.Module, Any], Any] | None = None
    history: Any | None = None
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    output_layers: frozenset[str] = frozenset()

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Run ``compute`` once per audit and share its result between rules."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def unused(self) -> frozenset[str]:
        """Normalization layers registered on the model but never called: absent from the graph's forward pass
        and, when a history was recorded, from every recorded step. Empty without a graph (nothing to tell)."""

        def compute() -> frozenset[str]:
            from bnaudit.graph import uncalled_norms

            if self.graph is None:
                return frozenset()
            return frozenset(n for n in uncalled_norms(self.model, self.graph) if not _ran_in_history(self.history, n))

        return self.cached("unused_norms", compute)

    @property
    def steps(self) -> int:
        """How many batches a probe may use."""
        return int(self.options.get("steps", 8))

    def batches(self, limit: int | None = None) -> Iterator[Batch]:
        """Batches from the data source moved to the audit device (nothing when there is no data)."""
        if self.data is None:
            return iter(())
        return self.data.batches(limit=self.steps if limit is None else limit, device=self.device)


def _ran_in_history(history: Any, name: str) -> bool:
    """Whether a recorded history shows ``name`` called in some step: its input was recorded in a step, or
    (when its input was not among the recorded layers) its ``num_batches_tracked`` moved, which only a
    train-mode call does."""
    history = getattr(history, "history", history)  # a Recorder stands for its History
    if history is None:
        return False
    import numpy as np

    if name in getattr(history, "info", {}):
        return bool(np.nansum(history.series(name, "calls")) > 0)
    info = getattr(history, "bn_info", {}).get(name)
    if info is None or len(history) == 0:
        return False
    counts = history.series(name, "num_batches_tracked")
    start = info.get("initial_num_batches_tracked", -1)
    return bool(start >= 0 and np.any(np.isfinite(counts) & (counts != start)))
