"""DistributedDataParallel wrappers: unwrap one, read what it knows about BatchNorm (``ddp_facts``) without
copying it, and hand those facts to the BN4xx rules while an audit of its inner module runs
(``ddp_context``). No collectives here."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# -- DDP wrappers ---------------------------------------------------------------------------------------------------


def _is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap_ddp(model: Any) -> Any:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if _is_ddp(model) else model


@dataclass(frozen=True)
class DDPFacts:
    """What a live DistributedDataParallel wrapper says about BatchNorm, read without copying it.

    Attributes:
        forward_sync_buffers: whether DDP broadcasts rank 0's buffers at every forward (``broadcast_buffers``
            before torch 2.13).
        has_sync_bn_at_wrap: whether the model held SyncBatchNorm when DDP wrapped it (DDP logs it then), or
            None when unknown.
        device_type: the wrapped module's device type at wrap time (``cpu``, ``cuda``).
        sync_bn_layers: names (inside the wrapper) of SyncBatchNorm layers it holds now.
    """

    forward_sync_buffers: bool
    has_sync_bn_at_wrap: bool | None
    device_type: str
    sync_bn_layers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def converted_after_wrap(self) -> bool:
        """SyncBatchNorm layers exist now that DDP did not see when it wrapped the model."""
        return bool(self.sync_bn_layers) and self.has_sync_bn_at_wrap is False


def ddp_facts(model: Any) -> DDPFacts | None:
    """Read a DistributedDataParallel wrapper's buffer and SyncBatchNorm facts (None for other modules).

    Must be given the live wrapper: a deep copy rebuilds DDP's construction log and loses
    ``has_sync_bn_at_wrap``.
    """
    if not _is_ddp(model):
        return None
    sync = tuple(n for n, m in model.module.named_modules() if isinstance(m, nn.SyncBatchNorm))
    at_wrap: bool | None = None
    try:
        at_wrap = bool(model._get_ddp_logging_data().get("has_sync_bn"))
    except Exception:  # noqa: BLE001 - a private API; without it the fact is just unknown
        at_wrap = None
    forward_sync = getattr(model, "forward_sync_buffers", None)
    if forward_sync is None:
        forward_sync = getattr(model, "broadcast_buffers", True)
    return DDPFacts(bool(forward_sync), at_wrap, str(getattr(model, "device_type", "cpu")), sync)


_DDP_FACTS: contextvars.ContextVar[DDPFacts | None] = contextvars.ContextVar("bnaudit_ddp_facts", default=None)


@contextmanager
def ddp_context(facts: DDPFacts | None) -> Iterator[None]:
    """Make a live DDP wrapper's facts visible to the BN4xx rules while an audit of its inner module runs
    (the audit works on a copy, and a copy of a DDP wrapper no longer knows what it saw at wrap time)."""
    token = _DDP_FACTS.set(facts)
    try:
        yield
    finally:
        _DDP_FACTS.reset(token)


def current_ddp_facts() -> DDPFacts | None:
    """The DDP facts set by ``ddp_context`` for the audit running now, if any."""
    return _DDP_FACTS.get()
