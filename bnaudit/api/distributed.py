"""``bnaudit.inspect_distributed``: the same audit on every rank of a process group, merged on one rank.

Everything that can fail on one rank alone (loading the model and data, the first forward pass) runs before
the first collective, and the ranks compare their outcome, so a failure raises on every rank instead of
leaving the others waiting."""

from __future__ import annotations

import copy
from typing import Any

import torch

from bnaudit.api.inspection import inspect
from bnaudit.api.preparation import prepare, preserved_rng
from bnaudit.distributed import DistributedError, ddp_context, ddp_facts, dist_info, merge_reports, unwrap_ddp
from bnaudit.distributed.comm import torch_dist
from bnaudit.findings import Report

__all__ = ["inspect_distributed"]


def inspect_distributed(model: Any, data: Any = None, *, group: Any = None, dst: int = 0, **kwargs: Any) -> Report | None:
    """Run ``bnaudit.inspect`` on every rank of a process group and return the merged report on rank ``dst``.

    Call it on every rank with the same arguments (each rank passes its own data shard). A
    DistributedDataParallel wrapper is unwrapped, and what it knows (buffer broadcasting, SyncBatchNorm seen
    at wrap time) is handed to BN402/BN403. The model and data are loaded, and the model run on the first
    batch, before the audit's collectives start; if that fails on any rank, every rank raises instead of
    waiting for the failed one.

    Args:
        model: this rank's model, its DDP wrapper, or a MODEL spec (never modified).
        data: this rank's data (any DATA spec or object ``bnaudit.inspect`` takes).
        group: process group for the checks and the merge (the rules use the default group).
        dst: the reporting rank.
        **kwargs: passed to ``bnaudit.inspect`` (select, ignore, rule_config, batch_size, steps, ...).

    Returns:
        The merged Report on ``dst``, None on the other ranks (the local report outside a process group).

    Raises:
        DistributedError: another rank could not load or run its model and data (names the rank and error).
        BnauditError: this rank's own model, data or options are unusable.
    """
    facts = ddp_facts(model)
    kwargs = dict(kwargs)
    error: BaseException | None = None
    try:
        model, data, kwargs = _preflight(unwrap_ddp(model), data, kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    info = dist_info(group)
    if info.active:
        # The rules' collectives only line up if every rank runs the same rules: compare what decides that.
        plan = {
            "data": data is not None,
            "select": sorted(kwargs.get("select") or []),
            "ignore": sorted(kwargs.get("ignore") or []),
        }
        status: list[Any] = [None] * info.world_size
        mine = (None if error is None else f"{type(error).__name__}: {error}", plan)
        torch_dist().all_gather_object(status, mine, group=group)
        failed = [(r, s[0]) for r, s in enumerate(status) if s[0] is not None]
        if failed and error is None:
            r, s = failed[0]
            raise DistributedError(f"the audit could not start on rank {r}: {s}; fix that rank's model or data")
        odd = [r for r, s in enumerate(status) if s[1] != status[0][1]]
        if odd and error is None:
            raise DistributedError(
                f"rank {odd[0]} runs a different audit than rank 0 ({status[odd[0]][1]} vs {status[0][1]}); give every "
                "rank data and the same select/ignore"
            )
    if error is not None:
        raise error
    with ddp_context(facts):
        report = inspect(model, data, **kwargs)
    return merge_reports(report, group=group, dst=dst)


def _preflight(model: Any, data: Any, kwargs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Prepare the model, data and predict function once and run the model on the first batch (in eval mode,
    on a copy), so that errors surface before any collective; returns what ``inspect`` then takes as is."""
    from bnaudit.errors import DataError
    from bnaudit.loading.specs import describe_exception

    prepared = prepare(
        model, data, kwargs.get("predict"), device=kwargs.get("device", "cpu"), weights=kwargs.pop("weights", None),
        trust_pickle=kwargs.pop("trust_pickle", False), input_key=kwargs.get("input_key"),
        batch_size=kwargs.get("batch_size", 32), example=False,
    )
    kwargs["predict"] = prepared.predict
    kwargs.setdefault("name", prepared.spec)
    if prepared.data is not None:
        dev = prepared.device
        probe = copy.deepcopy(prepared.model).to(dev).eval()
        with preserved_rng(dev):
            batch = prepared.data.first(device=dev, dtype=prepared.dtype)
        with torch.no_grad():
            try:
                probe(batch.inputs)
            except Exception as exc:
                raise DataError(
                    f"{prepared.spec}: the model rejected the first batch of its data ({describe_exception(exc)}); "
                    "check that this rank's data matches the model"
                ) from exc
    return prepared.model, prepared.data, kwargs
