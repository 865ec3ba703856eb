"""One audit, end to end: copy the model, build its layer graph on an example input, run the selected rules
in a RuleContext, and return a Report. The user's model object is deep-copied first and never touched.

Rule configuration (severity overrides, options, layer-glob ignores) is applied here, so the CLI, the API and
``bnaudit check`` all behave the same."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.errors import BnauditError, DataError, UsageError
from bnaudit.findings import Finding, Report, sort_findings
from bnaudit.graph import LayerGraph, build_graph
from bnaudit.layers import is_conv, is_linear
from bnaudit.loading.data import DataSource
from bnaudit.loading.specs import describe_exception
from bnaudit.rules.base import REQUIREMENTS, Rule
from bnaudit.rules.catalog import select_rules


def model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point() and not isinstance(p, nn.parameter.UninitializedParameter):
            return p.dtype
    return None


def infer_example(model: nn.Module, batch: int = 4) -> tuple[torch.Tensor | None, str]:
    """A random input shaped for the model's first layer, when that layer says what it takes."""
    dtype = model_dtype(model) or torch.float32
    for name, m in model.named_modules():
        if is_linear(m) and isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear):
            return torch.randn(batch, m.in_features, dtype=dtype), f"({batch}, {m.in_features}) from {name}"
        if is_conv(m) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            dims = m.weight.dim() - 2
            size = {1: (64,), 2: (32, 32), 3: (8, 16, 16)}[dims]
            shape = (batch, m.in_channels, *size)
            return torch.randn(*shape, dtype=dtype), f"{shape} from {name}"
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, (batch, 16)), f"({batch}, 16) token ids from {name}"
        if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
            shape = (batch, 16, m.input_size) if m.batch_first else (16, batch, m.input_size)
            return torch.randn(*shape, dtype=dtype), f"{shape} from {name}"
    return None, "no first layer to infer an input from"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The audit device.

    Raises:
        UsageError: an unknown device string or CUDA asked for where it is not available.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def _capabilities(graph: LayerGraph | None, data: DataSource | None, history: Any) -> dict[str, bool]:
    caps = {
        "graph": graph is not None,
        "shapes": graph is not None and graph.shapes_known,
        "data": data is not None,
        "predict": data is not None,
        "history": history is not None,
        "distributed": False,
    }
    try:
        import torch.distributed as dist

        caps["distributed"] = dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover - torch builds without distributed
        pass
    return caps


def run_audit(
    model: nn.Module,
    *,
    name: str,
    data: DataSource | None = None,
    predict: Callable[[nn.Module, Any], Any] | None = None,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    rule_config: Mapping[str, Mapping[str, Any]] | None = None,
    example: Any | None = None,
    history: Any | None = None,
    device: str | torch.device | None = "cpu",
    steps: int = 8,
    source_path: str | None = None,
    prefer_graph: str = "fx",
    meta: Mapping[str, Any] | None = None,
) -> Report:
    """Audit ``model`` (never modified) and return a Report.

    Args:
        model: the user's module; a private deep copy is audited.
        name: how the model is named in the report (its spec).
        data: batches for the dynamic probes, or None for static rules only.
        predict: the user's inference function, or None.
        select: rule codes/prefixes/names to run (default all).
        ignore: rule codes/prefixes/names to skip.
        rule_config: code -> {"severity": str, "options": dict, "ignore": [layer globs]}.
        example: the input for the graph's forward pass; default: the first batch, else inferred.
        history: a recorded training History for the rules that read one.
        device: where to run the probes.
        steps: how many batches the probes may use.
        source_path: the file the model came from (for SARIF).
        prefer_graph: ``fx`` or ``hooks``.
        meta: extra facts for the report.

    Returns:
        The Report with sorted findings.

    Raises:
        DataError: the model rejects the example input.
        ConfigError: a rule option in ``rule_config`` is invalid.
        UsageError: unknown rule codes in select/ignore/rule_config, or an unusable device.
    """
    dev = resolve_device(device)
    rule_config = dict(rule_config or {})
    instances = _configured_rules(select, ignore, rule_config)
    work = copy.deepcopy(model).to(dev)
    notes: dict[str, Any] = dict(meta or {})
    example = _example_input(work, data, example, dev, notes)
    graph, graph_note = _graph_of(work, example, prefer_graph, name, data, notes)
    ctx = RuleContext(
        model=work, graph=graph, device=dev, data=data, predict=predict, history=history, source=name,
        options={"steps": steps}, output_layers=graph.output_layers() if graph is not None else frozenset(),
    )  # type: ignore[arg-type]
    findings, ran, skipped = _run_rules(instances, ctx, _capabilities(graph, data, history), rule_config, name)

    notes.setdefault("device", str(dev))
    notes.setdefault("torch", torch.__version__)
    if data is not None:
        notes.setdefault("data", data.spec)
        notes.setdefault("batch_size", data.batch_size)
    return Report(
        model=name,
        findings=sort_findings(findings),
        layers=graph.layer_infos() if graph is not None else (),
        graph_method=graph.method if graph is not None else "none",
        graph_note=graph_note,
        rules_run=tuple(ran),
        rules_skipped=skipped,
        source_path=source_path,
        meta=notes,
    )


def _configured_rules(
    select: Iterable[str] | None, ignore: Iterable[str] | None, rule_config: Mapping[str, Mapping[str, Any]]
) -> list[Rule]:
    """The selected rules, each built with its configured severity and options.

    Raises:
        ConfigError: a rule option is invalid.
        UsageError: an unknown rule in select/ignore or in ``rule_config``.
    """
    instances: list[Rule] = []
    for cls in select_rules(select, ignore):
        cfg = rule_config.get(cls.code) or rule_config.get(cls.name) or {}
        instances.append(cls(severity=cfg.get("severity"), options=cfg.get("options")))
    known = {c.code for c in select_rules()} | {c.name for c in select_rules()}
    unknown = [k for k in rule_config if k not in known]
    if unknown:
        raise UsageError(f"rule configuration names unknown rule {unknown[0]!r}; `bnaudit rules` lists them")
    return instances


def _example_input(
    work: nn.Module, data: DataSource | None, example: Any | None, dev: torch.device, notes: dict[str, Any]
) -> Any | None:
    """The input for the graph's forward pass on ``dev``: the one given, else the first batch of ``data``,
    else one inferred from the first layer (None when none can be); ``notes`` records where it came from."""
    if example is None and data is not None:
        first = data.first(device=dev, dtype=model_dtype(work)).inputs
        notes["example_input"] = "first batch of --data"
        return first
    if example is None:
        example, how = infer_example(work)
        if example is not None:
            example = example.to(dev)
            notes["example_input"] = f"random, inferred: {how}"
        return example
    return example.to(dev) if isinstance(example, torch.Tensor) else example


def _graph_of(
    work: nn.Module,
    example: Any | None,
    prefer_graph: str,
    name: str,
    data: DataSource | None,
    notes: Mapping[str, Any],
) -> tuple[LayerGraph | None, str]:
    """The layer graph and its note; ``(None, why)`` when there is no example and fx cannot trace the model.

    Raises:
        DataError: the model's forward fails on the example (the message says which input that was).
    """
    try:
        graph = build_graph(work, example, prefer=prefer_graph)
    except ValueError as exc:  # no example and fx failed
        return None, f"{exc}; pass --data or --input-shape"
    except Exception as exc:  # noqa: BLE001 - the model's own forward failed on the example
        where = (
            "the first batch of --data" if data is not None
            else f"its example input ({notes['example_input']})" if "example_input" in notes
            else "an input inferred from its first layer"
        )
        raise DataError(
            f"{name}: the model rejected {where} ({describe_exception(exc)}); check that --data matches the "
            "model's input (or give --input-shape)"
        ) from exc
    return graph, graph.note


def _run_rules(
    instances: list[Rule],
    ctx: RuleContext,
    caps: Mapping[str, bool],
    rule_config: Mapping[str, Mapping[str, Any]],
    name: str,
) -> tuple[list[Finding], list[str], dict[str, str]]:
    """Run each rule whose needs ``caps`` meets; a rule that crashes is skipped with the reason, and findings
    on layers its configuration ignores are dropped.

    Returns:
        ``(findings, codes of the rules that ran, code -> why it was skipped)``.

    Raises:
        BnauditError: a rule's own typed error (bad data, bad predict), which ends the audit.
    """
    findings: list[Finding] = []
    ran: list[str] = []
    skipped: dict[str, str] = {}
    for rule in instances:
        missing = [req for req in sorted(rule.requires) if not caps.get(req, False)]
        if missing:
            skipped[rule.code] = REQUIREMENTS[missing[0]]
            continue
        try:
            produced = list(rule.check(ctx))
        except BnauditError:
            raise
        except Exception as exc:  # noqa: BLE001 - a rule's crash must not hide the other rules' findings
            skipped[rule.code] = f"internal error: {describe_exception(exc)}"
            continue
        ran.append(rule.code)
        globs = list((rule_config.get(rule.code) or rule_config.get(rule.name) or {}).get("ignore") or [])
        for f in produced:
            if f.layer and any(fnmatch.fnmatchcase(f.layer, g) for g in globs):
                continue
            findings.append(_with_audit(f, name))
    return findings, ran, skipped


def _with_audit(finding, name):
    from dataclasses import replace

    return replace(finding, audit=name)
