"""RuleContext: everything a rule may look at during one audit.

The audit builds it once: a private copy of the model (the user's object is never touched; probes run on
the copy and put it back after each experiment), its layer graph, the data source and predict function when
given, a recorded training history when one exists, and a cache so that probes shared by several rules (one
train-mode pass, one co-batch experiment) run once."""

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

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Run ``compute`` once per audit and share its result between rules."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def steps(self) -> int:
        """How many batches a probe may use."""
        return int(self.options.get("steps", 8))

    def batches(self, limit: int | None = None) -> Iterator[Batch]:
        """Batches from the data source moved to the audit device (nothing when there is no data)."""
        if self.data is None:
            return iter(())
        return self.data.batches(limit=self.steps if limit is None else limit, device=self.device)
