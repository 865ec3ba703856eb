"""``bnaudit.fix``: audit, plan the edits, apply them in memory, re-audit the edited code, roll back any fix
whose finding remains, then write (or only diff).

Every audit runs on a copy of the model's file (``bnaudit.fixing.workspace``). The user's file is written
only at the end, atomically, and only when something changed and ``diff`` is false; a checkpoint is written
only to ``output``, never over the user's weights."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnaudit.errors import UsageError
from bnaudit.findings import Report
from bnaudit.fixing.catalog import fix_info
from bnaudit.fixing.planning import Planned, plan_source_edits, sequential_index
from bnaudit.fixing.results import (
    APPLIED,
    NOT_FIXABLE,
    ROLLED_BACK,
    SKIPPED,
    FixOutcome,
    FixResult,
    layer_key,
)
from bnaudit.fixing.source import SourceEdit, Unfixable, apply_edits, reorder
from bnaudit.fixing.workspace import Workspace

__all__ = ["FixOutcome", "FixResult", "fix"]

_AUDIT_OPTIONS = frozenset({
    "predict", "weights", "trust_pickle", "select", "ignore", "rule_config", "input_shape", "input_key",
    "batch_size", "steps", "device", "graph",
})


def _renamer(made: Iterable[SourceEdit], lines: Mapping[str, int]) -> dict[str, Callable[[str], str]]:
    """Per moved nn.Sequential (its layer prefix): a function from old layer names to new ones."""
    moves: dict[str, list[tuple[int, int]]] = {}
    for e in made:
        if e.op == "move":
            (parent, i), (_, j) = sequential_index(e.layer), sequential_index(e.after_layer)  # type: ignore[misc]
            moves.setdefault(parent, []).append((i, j))
    out: dict[str, Callable[[str], str]] = {}
    for parent, pairs in moves.items():
        head = f"{parent}." if parent else ""
        count = 1 + max(int(n[len(head):].split(".")[0]) for n in lines
                        if n.startswith(head) and n[len(head):].split(".")[0].isdigit() and n != parent)
        order = reorder(count, pairs)
        out[parent] = _index_renamer(head, {old: new for new, old in enumerate(order)})
    return out


def _index_renamer(head: str, new_index: Mapping[int, int]) -> Callable[[str], str]:
    def rename(name: str) -> str:
        if not name.startswith(head):
            return name
        first, dot, tail = name[len(head):].partition(".")
        if not first.isdigit() or int(first) not in new_index:
            return name
        return f"{head}{new_index[int(first)]}{dot}{tail}"

    return rename


def _compose(renamers: Mapping[str, Callable[[str], str]]) -> Callable[[str], str]:
    def rename(name: str) -> str:
        for fn in renamers.values():
            name = fn(name)
        return name

    return rename


def _state_key_renamer(rename: Callable[[str], str]) -> Callable[[str], str]:
    def key(name: str) -> str:
        layer, _, leaf = name.rpartition(".")
        return f"{rename(layer)}.{leaf}" if layer else name

    return key


@dataclass
class _Run:
    """The working state of one fix: the plan, the edits still active, what was rolled back or refused."""

    text: str
    planned: list[Planned]
    active: list[SourceEdit]
    refused: dict[int, str] = field(default_factory=dict)  # id(edit) -> why
    rolled_back: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def _check_model_spec(model: Any) -> tuple[Path, str]:
    """The model's file and NAME (``""`` for a bnaudit model file).

    Raises:
        UsageError: not a ``PATH.py[:NAME]`` spec or a model file, or the file is missing.
    """
    from bnaudit.loading.models import MODEL_FILE_SUFFIXES
    from bnaudit.loading.specs import missing_file, parse_py_spec

    if not isinstance(model, (str, Path)):
        raise UsageError("bnaudit.fix edits the model's source file: give MODEL as PATH.py[:NAME], not an object")
    if str(model).endswith(MODEL_FILE_SUFFIXES):
        path = Path(model).expanduser()
        if not path.is_file():
            raise UsageError(f"{model}: {missing_file(path)}")
        return path.resolve(), ""
    spec = parse_py_spec(str(model))
    if spec is None or spec.path is None:
        raise UsageError(f"{model}: bnaudit fix edits a Python file; give MODEL as PATH.py[:NAME]")
    path = spec.path.expanduser()
    if not path.is_file():
        raise UsageError(f"{model}: {missing_file(path)}")
    return path.resolve(), spec.attr or "build_model"


def _fixed_state(ws: Workspace, run: _Run, made: list[SourceEdit], original: Mapping[str, Any],
                 new_text: str, rename: Callable[[str], str]) -> dict[str, Any]:
    """The user's checkpoint fitted to the edited source: BN101 biases folded, keys renamed and fitted."""
    from bnaudit.fixing.checkpoint import adapt_state, fold_bias

    state = dict(original)
    for e in made:
        if e.code == "BN101":
            feeds = next(p.finding.evidence.get("feeds") or [] for p in run.planned if p.edit is e)
            state = fold_bias(state, e.layer, feeds)
        elif e.code == "BN105":
            state = _per_step(state, e.layer, int(e.expect))  # type: ignore[call-overload]
    template = ws.load(new_text, None).module.state_dict()
    fitted, notes = adapt_state(state, template, _state_key_renamer(rename))
    run.notes = notes
    return fitted


def _per_step(state: Mapping[str, Any], layer: str, steps: int) -> dict[str, Any]:
    """BN105: the shared BatchNorm's entries copied to each step's BatchNorm in the new ModuleList."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith(layer + "."):
            for i in range(steps):
                out[f"{layer}.{i}.{key[len(layer) + 1:]}"] = value.clone()
        else:
            out[key] = value
    return out


def _check_folds(run: _Run, original: Mapping[str, Any]) -> None:
    """With a checkpoint, a BN101 fix whose bias cannot be folded exactly is refused up front."""
    from bnaudit.fixing.checkpoint import fold_bias

    for p in run.planned:
        if p.edit is not None and p.edit.code == "BN101":
            try:
                fold_bias(original, p.edit.layer, p.finding.evidence.get("feeds") or [])
            except Unfixable as exc:
                run.refused[id(p.edit)] = f"{exc}; with --weights the bias must fold into the BatchNorm"
                run.active.remove(p.edit)


def _iterate(ws: Workspace, run: _Run, before: Report, original: Mapping[str, Any] | None, path: Path) -> tuple[
        str, Report, list[SourceEdit], dict[str, Any] | None, Callable[[str], str]]:
    """Apply the active edits, re-audit, and roll back the edits whose findings remain, until none does."""
    while True:
        new_text, made, refused = apply_edits(run.text, run.active, indices=_indices(run.active), path=str(path))
        for edit, why in refused:
            run.refused[id(edit)] = why
        rename = _compose(_renamer(made, before.source_lines))
        if not made:
            return run.text, before, [], (dict(original) if original is not None else None), rename
        state = _fixed_state(ws, run, made, original, new_text, rename) if original is not None else None
        after = ws.audit(new_text, state)
        remaining = {layer_key(f) for f in after.findings}
        stuck = [e for e in made if (e.code, rename(e.layer)) in remaining]
        if not stuck:
            return new_text, after, made, state, rename
        run.rolled_back.update(id(e) for e in stuck)
        run.active = [e for e in made if id(e) not in run.rolled_back]


def _indices(edits: Iterable[SourceEdit]) -> dict[str, int]:
    return {e.layer: sequential_index(e.layer)[1] for e in edits  # type: ignore[index]
            if e.op == "move" and sequential_index(e.layer) is not None}


def _outcomes(run: _Run, made: list[SourceEdit], checkpoint: list[FixOutcome]) -> list[FixOutcome]:
    done = {id(e) for e in made}
    out = []
    for p in run.planned:
        f = p.finding
        if p.edit is None:
            out.append(FixOutcome(f.code, f.layer, p.line, p.kind, p.status, p.reason))
        elif id(p.edit) in done:
            out.append(FixOutcome(f.code, f.layer, p.line, p.kind, APPLIED, p.edit.description))
        elif id(p.edit) in run.rolled_back:
            out.append(FixOutcome(f.code, f.layer, p.line, p.kind, ROLLED_BACK,
                                  f"{p.edit.description}: the re-audit still reported {f.code}, so it was not applied"))
        else:
            out.append(FixOutcome(f.code, f.layer, p.line, p.kind, NOT_FIXABLE, run.refused.get(id(p.edit), "")))
    out.extend(checkpoint)
    return out


def fix(
    model: str | Path,
    data: Any = None,
    *,
    unsafe_fixes: bool = False,
    diff: bool = False,
    output: str | Path | None = None,
    force: bool = False,
    inspect: Callable[..., Report],
    **audit: Any,
) -> FixResult:
    """Audit MODEL, fix what can be fixed in its source file (and checkpoint), and re-audit the result.

    Safe fixes (BN101, BN106, BN108) keep the model's function and are always applied; unsafe ones (BN103,
    BN104, BN105, BN107) only with ``unsafe_fixes``. Each fix edits only the constructor call its finding points at
    (LibCST: comments and formatting are kept). A fix whose finding the re-audit still reports is rolled back.
    With ``weights`` and ``output``, the checkpoint is fixed too (BN101's bias folded into running_mean, keys
    fitted to the edited source) and BN302/BN303/BN209 are repaired by recalibrating on ``data``.

    Args:
        model: ``PATH.py[:NAME]`` (NAME defaults to ``build_model``); that file is the one edited. A bnaudit
            model file (``.pt``) gets the checkpoint fixes only, written to ``output``.
        data: as for ``bnaudit.inspect``.
        unsafe_fixes: apply the unsafe fixes too.
        diff: compute the diff only; write nothing.
        output: where to write the fixed checkpoint (needs ``weights``); the user's weights are never changed.
        force: replace an existing ``output``.
        inspect: the audit function, ``bnaudit.inspect`` (``bnaudit.fix`` passes it: fixing sits below the
            API layer).
        **audit: ``bnaudit.inspect``'s options (``weights``, ``predict``, ``select``, ``ignore``,
            ``rule_config``, ``input_shape``, ``batch_size``, ...), used for every audit the fix runs.

    Returns:
        A FixResult: the outcomes, the diff, the audits before and after, the files written.

    Raises:
        UsageError: MODEL is neither a Python file spec nor a bnaudit model file, or ``output`` without
            ``weights`` for a Python MODEL.
        FixSourceError: the file does not parse, or an edit would leave it unparsable (nothing is written).
        SpecError, WeightsError, DataError, ConfigError, OutputError: as for ``bnaudit.inspect``.
    """
    path, attr = _check_model_spec(model)
    unknown = sorted(set(audit) - _AUDIT_OPTIONS)
    if unknown:
        raise UsageError(f"bnaudit.fix got an unknown option {unknown[0]!r}")
    weights = audit.pop("weights", None)
    if not attr:
        return _fix_model_file(path, str(model), data, weights, audit, diff=diff, output=output, force=force,
                               inspect=inspect)
    if output is not None and weights is None:
        raise UsageError("-o/--output writes the fixed checkpoint: give the checkpoint with --weights")
    from bnaudit.files import OutputPlan, read_text_capped, spec_paths

    plan = OutputPlan(inputs=spec_paths(model, data, audit.get("predict"), weights))
    if output is not None and not diff:
        plan.file(output, label="--output", replace=force)
    plan.check()
    read_text_capped(path, what="model file")  # the size and encoding checks
    with open(path, encoding="utf-8", newline="") as fh:  # keep "\r\n" line endings as they are
        text = fh.read()
    ws = Workspace(path, attr, str(model), {**audit, "data": data}, inspect)
    try:
        before = ws.audit(text, weights)
        planned = plan_source_edits(before, unsafe_fixes=unsafe_fixes)
        run = _Run(text, planned, [p.edit for p in planned if p.edit is not None])
        original = ws.load(text, weights).module.state_dict() if weights is not None else None
        if original is not None:
            _check_folds(run, original)
        new_text, after, made, state, rename = _iterate(ws, run, before, original, path)
        checkpoint: list[FixOutcome] = []
        if state is not None:
            from bnaudit.fixing.repair import repair_checkpoint

            state, after, checkpoint = repair_checkpoint(
                ws, new_text, state, after, data=data, enabled=output is not None, source=f"{path}:{attr}",
                batch_size=audit.get("batch_size", 32), input_key=audit.get("input_key"), notes=run.notes,
            )
        else:
            checkpoint = _checkpoint_skips(before, "give the checkpoint with --weights and -o OUT to fix it")
    finally:
        ws.close()
    result = FixResult(
        path=path, outcomes=_outcomes(run, made, checkpoint), diff=_diff(text, new_text, model),
        before=before, after=after, checkpoint_notes=run.notes,
        renames={f.layer: rename(f.layer) for f in before.findings if f.layer and rename(f.layer) != f.layer},
    )
    if not diff:
        result.written = _write(plan, path, text, new_text, output, state)
    return result


def _checkpoint_skips(report: Report, why: str) -> list[FixOutcome]:
    out = []
    for f in report.findings:
        info = fix_info(f.code)
        if info is not None and info.kind == "checkpoint":
            line = report.source_lines.get(f.layer or "\0")
            out.append(FixOutcome(f.code, f.layer, line, info.kind, SKIPPED, why))
    return out


def _diff(old: str, new: str, model: Any) -> str:
    if old == new:
        return ""
    name = str(model).rpartition(":")[0] if str(model).rpartition(":")[0].endswith(".py") else str(model)
    before, after = (name, name) if Path(name).is_absolute() else (f"a/{name}", f"b/{name}")
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=before, tofile=after))


def _write(plan: Any, path: Path, old: str, new: str, output: str | Path | None, state: Any) -> list[Path]:
    contents: dict[Path, Any] = {}
    if new != old:
        # The model file is the one file bnaudit rewrites: that is what `fix` is for (after the plan's checks,
        # which refuse any .py output, so it is declared only now).
        plan.file(path, label="the model file", replace=True)
        contents[path] = new.encode("utf-8")
    if output is not None and state is not None:
        import torch

        payload = dict(state) if "bnaudit_format" in state else {k: v.detach().cpu().clone() for k, v in state.items()}
        contents[Path(output)] = lambda tmp: torch.save(payload, tmp)
    return plan.commit(contents) if contents else []


def _fix_model_file(path: Path, name: str, data: Any, weights: Any, audit: dict[str, Any], *, diff: bool,
                    output: str | Path | None, force: bool, inspect: Callable[..., Report]) -> FixResult:
    """The checkpoint fixes for a bnaudit model file; its source fixes are listed (the file holds no source)."""
    import torch

    from bnaudit.files import OutputPlan, spec_paths
    from bnaudit.fixing.repair import repair_checkpoint
    from bnaudit.fixing.workspace import ModelFileWorkspace

    plan = OutputPlan(inputs=spec_paths(name, data, audit.get("predict"), weights))
    if output is not None and not diff:
        plan.file(output, label="--output", replace=force)
    plan.check()
    ws = ModelFileWorkspace(path, name, {**audit, "data": data}, inspect)
    notes: list[str] = []
    try:
        before = ws.audit("", weights)
        original = ws.load("", weights).module.state_dict()
        state, after, checkpoint = repair_checkpoint(
            ws, "", original, before, data=data, enabled=output is not None, source=str(path),
            batch_size=audit.get("batch_size", 32), input_key=audit.get("input_key"), notes=notes,
        )
    finally:
        ws.close()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    source = saved.get("source", "its source") if isinstance(saved, dict) else "its source"
    outcomes = [
        FixOutcome(f.code, f.layer, None, info.kind, NOT_FIXABLE,
                   f"MODEL is a bnaudit model file: fix the source it is built from ({source}), then redo the transforms")
        for f in before.findings if (info := fix_info(f.code)) is not None and info.kind != "checkpoint"
    ]
    result = FixResult(path=path, outcomes=outcomes + checkpoint, diff="", before=before, after=after,
                       checkpoint_notes=notes)
    if state is not original and not diff and output is not None:
        payload = state if "bnaudit_format" in state else {**saved, "state_dict": state}
        result.written = _write(plan, path, "", "", output, payload)
    return result
