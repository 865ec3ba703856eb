"""Putting a model back after an experiment: ``ModelState`` captures once what an experiment can move on a
model, and ``ModelState.restoring()`` puts all of it back after each experiment, whatever happens inside.

What it puts back: every module's training flag, every buffer's values (BatchNorm's running statistics and
counter above all; the buffer object too, if the experiment replaced it), the parameters' ``requires_grad``
flags, and the value of any parameter whose version counter, dtype, device or shape changed (a user's
``predict()`` is arbitrary code). Buffers are copied back unconditionally: torch's fused BatchNorm updates
its running statistics without bumping their version counters. The global RNG is not its business: each
experiment forks it (``probes.common.seeded``).

An audit copies the user's model once and runs every experiment on that copy through one ModelState, one
after the other; a deep copy per experiment had cost more than the model's own forward passes on
EfficientNets (10 copies per ``inspect --data``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bnaudit.context import RuleContext

__all__ = ["ModelState", "audit_state"]


class ModelState:
    """A snapshot of everything an experiment may move on ``model``, taken at construction.

    Args:
        model: the model the experiments will run on (changed by them, then put back).

    The snapshot holds a copy of every parameter and buffer (one model's worth of memory), so it should be
    taken once and reused, not per experiment.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(m, m.training) for m in model.modules()]
        self._buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self._params: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor, bool]] = []
        self._versions: dict[int, int] = {}
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    self._buffers.append((m, name, b, b.detach().clone()))
            for name, p in m._parameters.items():
                if p is None or isinstance(p, nn.parameter.UninitializedParameter):
                    continue
                self._params.append((m, name, p, p.detach().clone(), p.requires_grad))
                self._versions[id(p)] = p._version

    @contextmanager
    def restoring(self) -> Iterator[nn.Module]:
        """Run the block on the model and restore the snapshot afterwards, on success or failure."""
        try:
            yield self.model
        finally:
            self.restore()

    def restore(self) -> None:
        """Put the snapshot back: training flags, buffers, requires_grad, and any parameter that changed."""
        for m, flag in self._flags:
            m.training = flag
        with torch.no_grad():
            for m, name, b, saved in self._buffers:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                _put_back(b, saved)
            for m, name, p, saved, requires_grad in self._params:
                if m._parameters.get(name) is not p:
                    m._parameters[name] = p
                if p._version != self._versions[id(p)] or _moved(p, saved):
                    _put_back(p, saved)
                    self._versions[id(p)] = p._version
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)


def _moved(t: torch.Tensor, saved: torch.Tensor) -> bool:
    return t.dtype != saved.dtype or t.device != saved.device or t.shape != saved.shape


def _put_back(t: torch.Tensor, saved: torch.Tensor) -> None:
    if _moved(t, saved):
        t.data = saved.clone()  # the experiment converted it (model.half(), .to(...)): the original object back
    else:
        t.copy_(saved)


def audit_state(ctx: RuleContext) -> ModelState:
    """The one ModelState of an audit's model, taken before its first experiment."""
    return ctx.cached("model_state", lambda: ModelState(ctx.model))


def state_for(model: nn.Module, state: Any | None) -> ModelState:
    """``state`` when given for this model, else a fresh snapshot of it (a probe called on its own)."""
    if state is not None:
        if state.model is not model:
            raise ValueError("the ModelState given was taken of another model")
        return state
    return ModelState(model)
