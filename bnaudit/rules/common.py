"""Helpers several rule modules share: how a list of layer names is written in a message, the BatchNorm nodes
of the layer graph, and what the BN3xx experiments (``modes``, ``running_stats``) share per audit: the batches,
read once, the probe state, and the ``bnaudit recalibrate`` command a fix suggests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from bnaudit.context import RuleContext
from bnaudit.graph import Node
from bnaudit.layers import is_batchnorm


def name_list(names: Sequence[str], limit: int = 6) -> str:
    """``a, b, c and 4 more``: at most ``limit`` names, then a count."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def graph_batchnorms(ctx: RuleContext) -> Iterator[Node]:
    """The layer graph's BatchNorm nodes, in graph order."""
    for node in ctx.graph.nodes.values():
        if is_batchnorm(node.module):
            yield node


def _spec_or(text: str | None, placeholder: str) -> str:
    """A spec as the user could type it again, else a placeholder (objects passed in Python have none)."""
    if not text or " " in text:
        return placeholder
    if ":" in text or text.endswith((".py", ".pt", ".pth", ".ckpt", ".npz", ".csv")):
        return text
    return placeholder


def recalibrate_cmd(ctx: RuleContext) -> str:
    """The ``bnaudit recalibrate`` command line for this audit's model and data, with placeholders for what
    was passed as a Python object."""
    model = _spec_or(ctx.source, "MODEL")
    data = _spec_or(getattr(ctx.data, "spec", None), "DATA")
    return f"bnaudit recalibrate {model} --data {data} -o recalibrated.pt"


def audit_batches(ctx: RuleContext, limit: int | None = None) -> Iterator[Any]:
    """The audit's batches on its device, floating inputs cast to the model's dtype (a bfloat16 model gets
    bfloat16 batches, as the graph pass gave it). Read from the data once per audit and shared, so that every
    experiment sees the same batches (a shuffling loader would deal each reader others) and BN304 can pair
    its eval-mode outputs with the train-mode pass BN302 ran."""
    if ctx.data is None:
        return iter(())

    def read() -> list[Any]:
        dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), None)
        return list(ctx.data.batches(limit=ctx.steps, device=ctx.device, dtype=dtype))

    batches = ctx.cached("modes.batches", read)
    return iter(batches if limit is None else batches[:limit])


def probe_state(ctx: RuleContext) -> Any:
    """The audit's shared probe state (``bnaudit.probes.state.audit_state``), imported only when a rule runs."""
    from bnaudit.probes.state import audit_state

    return audit_state(ctx)


__all__ = ["audit_batches", "graph_batchnorms", "name_list", "probe_state", "recalibrate_cmd"]
