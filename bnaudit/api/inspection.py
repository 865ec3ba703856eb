"""``bnaudit.inspect``: one audit of a model, from objects or specs, as ``bnaudit inspect`` runs it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from bnaudit.api.preparation import Prepared, prepare, preserved_rng, with_example
from bnaudit.findings import Report

__all__ = ["inspect"]


def inspect(
    model: Any,
    data: Any = None,
    *,
    predict: str | Callable[..., Any] | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    rule_config: Mapping[str, Mapping[str, Any]] | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    input_key: str | None = None,
    batch_size: int = 32,
    steps: int = 8,
    device: str = "cpu",
    history: Any | None = None,
    graph: str = "fx",
    name: str | None = None,
) -> Report:
    """Audit a model's normalization: static rules on its layer graph, plus dynamic probes when data is given.

    Args:
        model: an nn.Module or a MODEL spec (``model.py:build_model``, ``pkg.mod:Net``, a bnaudit ``.pt``).
        data: a DATA spec or object (DataLoader, Dataset, tensor, (inputs, targets), iterable of batches).
            None: ``build_data`` in the model's file if it has one, else static rules only.
        predict: the user's ``predict(model, inputs)`` or its spec; None: ``predict`` in the model's file.
        weights: a state_dict file to load into the model first.
        trust_pickle: allow a ``.pt`` MODEL holding a whole pickled module.
        select: rule codes, prefixes or names to run (default all).
        ignore: rule codes, prefixes or names to skip.
        rule_config: per-rule settings: code -> {"severity", "options", "ignore": [layer globs]}.
        input_shape: one sample's shape (``"3x32x32"``) for the graph when there is no data.
        input_key: the input's key in dict batches.
        batch_size: batch size where bnaudit batches the data itself.
        steps: batches the probes may use.
        device: ``cpu`` or ``cuda[:N]``.
        history: a recorded training History (from ``bnaudit.record``) for the history rules.
        graph: ``fx`` (torch.fx where it traces) or ``hooks`` (follow tensors at run time).
        name: the report's name for the model (default: the spec or class name).

    Returns:
        A Report; ``report.to_dict()`` is the JSON the CLI prints.

    Raises:
        SpecError, WeightsError, DataError, ConfigError, UsageError: bad input, with a one-line message.
    """
    from bnaudit.audit import run_audit

    if type(model).__name__ == "DistributedDataParallel":
        # Audit the wrapped module (a deep copy of a live DDP wrapper can fail or forget what it saw when it
        # wrapped), keeping the wrapper's facts visible to the distributed rules.
        from bnaudit.distributed import ddp_context, ddp_facts, unwrap_ddp

        with ddp_context(ddp_facts(model)):
            return inspect(
                unwrap_ddp(model), data, predict=predict, weights=weights, trust_pickle=trust_pickle,
                select=select, ignore=ignore, rule_config=rule_config, input_shape=input_shape,
                input_key=input_key, batch_size=batch_size, steps=steps, device=device, history=history,
                graph=graph, name=name or f"DistributedDataParallel({type(model.module).__name__})",
            )

    with preserved_rng(device):
        prepared = prepare(model, data, predict, device=device, weights=weights, trust_pickle=trust_pickle,
                           input_shape=input_shape, input_key=input_key, batch_size=batch_size, example=False)
        meta: dict[str, Any] = {"weights": str(weights)} if weights else {}
        if prepared.data is None:
            # Without data the graph needs an example: --input-shape, else one inferred from the first layer.
            prepared = with_example(prepared, input_shape=input_shape, batch_size=batch_size)
            if prepared.example is not None:
                meta["example_input"] = (
                    prepared.example_note if not prepared.example_inferred
                    else "random, inferred: " + prepared.example_note.removeprefix("random ")
                )
        report = run_audit(
            prepared.model,
            name=name or prepared.spec,
            data=prepared.data,
            predict=prepared.predict,
            select=select,
            ignore=ignore,
            rule_config=rule_config,
            example=prepared.example,
            history=history,
            device=prepared.device,
            steps=steps,
            source_path=str(prepared.loaded.source_path) if prepared.loaded.source_path else None,
            prefer_graph=graph,
            meta=meta or None,
        )
    return _with_source_lines(report, prepared)


def _with_source_lines(report: Report, prepared: Prepared) -> Report:
    """The report with each layer's line in the model's source file, when the model came from one."""
    if report.source_path is None:
        return report
    from dataclasses import replace

    from bnaudit.report.locations import layer_lines

    loaded = prepared.loaded
    return replace(report, source_lines=layer_lines(loaded.module, report.source_path, loaded.named))
