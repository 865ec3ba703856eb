"""What ``bnaudit insert-bn``, ``fold-bn``, ``swap-norm`` and ``recalibrate`` show, as styled lines and
tables: the architecture diff, the list of changes, the per-layer recalibration fit, the file written and the
commands to run next. Plain data (text and a rich style name), so the CLI draws it and nothing here prints
or imports a terminal toolkit."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

__all__ = [
    "Line",
    "Rows",
    "View",
    "model_written",
    "recalibration_view",
    "state_dict_written",
    "transform_view",
]

Line: TypeAlias = tuple[str, str]
"""One line of text and its style (a rich style name; "" for none). Brackets in the text are literal."""


@dataclass(frozen=True)
class Rows:
    """A borderless table with a bold header; every column folds long cells.

    Attributes:
        columns: (header, justify) per column; justify is "left" or "right".
        rows: the cells; a ``Line`` is literal text with a style, a ``str`` is rich markup.
    """

    columns: tuple[tuple[str, str], ...]
    rows: tuple[tuple[Line | str, ...], ...]


View: TypeAlias = list[Line | Rows]
_DIFF_STYLE = {"+": "green", "-": "red", "@": "cyan"}
_RECAL_COLUMNS = ("layer", "channels", "z before", "r before", "z after", "r after", "batches tracked")


def transform_view(spec: str, example_note: str, before: Any, result: Any, *, title: str) -> View:
    """The title, the example input, the architecture diff, the table of changes, the summary and what it
    says of the max abs error (measured after a calibrated insert-bn, not measured by fold-bn).

    Args:
        spec: the MODEL as given.
        example_note: where the example input came from ("" when none).
        before: the model before the transform.
        result: the TransformResult.
        title: the command, e.g. ``swap-norm --to group``.
    """
    from bnaudit.transforms import architecture_diff

    view: View = [(f"{title}: {spec}", "bold")]
    if example_note:
        view.append((f"example input: {example_note}", "dim"))
    lines = architecture_diff(before, result.model)
    if lines:
        view.append(("architecture (before -> after):", "bold"))
        view.extend((line, _DIFF_STYLE.get(line[:1], "dim")) for line in lines)
    if result.changes or result.skipped:
        rows = [((c.action, "green"), c.layer, c.detail, c.reason) for c in result.changes]
        rows += [(("skip", "yellow"), c.layer, c.detail, c.reason) for c in result.skipped]
        view.append(Rows(tuple((name, "left") for name in ("", "layer", "change", "why")), tuple(rows)))
    view.append((result.summary(), "bold"))
    err = result.max_abs_error
    if result.name == "insert_bn" and err is not None:
        view.append((f"calibrated: max abs eval-output difference to the original {err:.3g}", ""))
    if result.name == "fold_bn" and err is None:
        view.append(("max abs error not measured: no example input (pass --data or --input-shape)", ""))
    return view


def model_written(path: Path, *, data_spec: str | None, transform: str) -> View:
    """The file written in bnaudit's model file format and the commands to run next."""
    out = shlex.quote(str(path))
    view: View = [(f"wrote {path}", ""), ("next:", "bold")]
    data = f" --data {shlex.quote(data_spec)}" if data_spec else " --data DATA"
    view.append((f"  bnaudit inspect {out}{data if data_spec else ''}", ""))
    if transform == "insert_bn":
        view.append((f"  bnaudit train-compare {out}{data}", ""))
    view.append((f"  python -c \"import bnaudit.transforms as t; m = t.load({str(path)!r})\"", "dim"))
    return view


def state_dict_written(path: Path, *, model: str, data_spec: str, pickled: bool) -> View:
    """A plain state_dict written for ``--weights`` and the command that audits it."""
    trust = " --trust-pickle" if pickled else ""
    weights = f"--weights {shlex.quote(str(path))}"
    return [
        (f"wrote {path} (a plain state_dict: load it with --weights or model.load_state_dict)", ""),
        ("next:", "bold"),
        (f"  bnaudit inspect {shlex.quote(model)}{trust} {weights} --data {shlex.quote(data_spec)}", ""),
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def recalibration_view(model: str, data_spec: str, table: Any) -> View:
    """The title, the data used, the per-layer before/after fit (z and r) and the layers left as they were.

    Args:
        model: the MODEL as given.
        data_spec: the DATA the statistics were estimated on.
        table: the RecalibrationTable.
    """
    dropped = f", {table.dropped_batches} single-sample batches left out" if table.dropped_batches else ""
    rows: Sequence[tuple[Line | str, ...]] = [
        (
            row.layer, str(row.channels), _fmt(row.z_before), _fmt(row.r_before), _fmt(row.z_after),
            _fmt(row.r_after), f"{row.num_batches_tracked_before} -> {row.num_batches_tracked_after}",
        )
        for row in table
    ]
    columns = tuple((col, "left" if col == "layer" else "right") for col in _RECAL_COLUMNS)
    view: View = [
        (f"recalibrate: {model}", "bold"),
        (f"data: {data_spec} ({table.batches} batches, {table.samples} samples{dropped})", "dim"),
        Rows(columns, tuple(rows)),
    ]
    view.extend((f"skip {layer}: {why}", "yellow") for layer, why in table.skipped.items())
    return view
