"""What the transform and recalibrate commands show, built without the CLI: ``bnaudit.report.transforms``
views of real transforms on sklearn digits, the writers of ``bnaudit.api.transforms`` (the file they write
loads back), and ``loading.modelfile.holds_model_file`` on a bnaudit file, a state_dict, a pickled module
and a missing file."""

from __future__ import annotations

from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from bnaudit.api.transforms import insert_bn_prepared, model_file_writer, recalibrate, swap_norm_prepared
from bnaudit.loading.modelfile import holds_model_file, read_model_file
from bnaudit.report.transforms import Rows, model_written, recalibration_view, state_dict_written, transform_view


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])


def _mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(32)] if bn else []
    return nn.Sequential(nn.Linear(64, 32), *norm, nn.ReLU(), nn.Linear(32, 10))


def test_insert_bn_view_has_diff_table_summary_and_calibration_note():
    x, y = _digits()
    done = insert_bn_prepared(_mlp(), (x, y), calibrate=(x, y))
    view = transform_view("net.py", done.prepared.example_note, done.prepared.model, done.result, title="insert-bn")
    lines = [item for item in view if isinstance(item, tuple)]
    tables = [item for item in view if isinstance(item, Rows)]
    assert lines[0] == ("insert-bn: net.py", "bold")
    assert ("architecture (before -> after):", "bold") in lines
    assert any(text.startswith("+") and "BatchNorm1d(32" in text and style == "green" for text, style in lines)
    assert len(tables) == 1 and [c for c, _ in tables[0].columns] == ["", "layer", "change", "why"]
    actions = [row[0] for row in tables[0].rows]
    assert ("insert", "green") in actions and ("skip", "yellow") in actions  # the output layer is skipped
    assert lines[-1][0].startswith("calibrated: max abs eval-output difference to the original")


def test_swap_norm_view_has_no_error_note_and_written_lines_quote_paths(tmp_path: Path):
    x, y = _digits()
    done = swap_norm_prepared(_mlp(bn=True), "group", (x, y))
    view = transform_view("m.py", "", done.prepared.model, done.result, title="swap-norm --to group")
    assert not any(isinstance(i, tuple) and i[0].startswith(("calibrated", "max abs error not")) for i in view)
    out = tmp_path / "a b.pt"
    written = model_written(out, data_spec="d.py:build_data", transform="insert_bn")
    texts = [text for text, _ in written]
    assert texts[0] == f"wrote {out}"
    assert f"  bnaudit inspect '{out}' --data d.py:build_data" in texts
    assert f"  bnaudit train-compare '{out}' --data d.py:build_data" in texts
    assert not any("train-compare" in t for t, _ in model_written(out, data_spec=None, transform="fold_bn"))
    plain = state_dict_written(out, model="m.pt", data_spec="d.py", pickled=True)
    assert plain[-1][0] == f"  bnaudit inspect m.pt --trust-pickle --weights '{out}' --data d.py"


def test_model_file_writer_writes_a_file_that_holds_the_new_model(tmp_path: Path):
    x, y = _digits()
    done = swap_norm_prepared(_mlp(bn=True), "group", (x, y))
    path = tmp_path / "m.pt"
    model_file_writer(done.result, "net.py:build_model")(path)
    assert holds_model_file(path)
    saved = read_model_file(path)
    assert saved["transform"]["name"] == "swap_norm"
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in done.result.model.state_dict().items())


def test_holds_model_file_is_false_for_everything_else(tmp_path: Path):
    torch.save(_mlp().state_dict(), tmp_path / "state.pt")
    torch.save(_mlp(), tmp_path / "pickled.pt")  # a whole module: weights_only loading refuses it
    (tmp_path / "text.pt").write_text("not a torch file")
    for name in ("state.pt", "pickled.pt", "text.pt", "missing.pt"):
        assert not holds_model_file(tmp_path / name), name


def test_recalibration_view_rows_and_columns():
    x, y = _digits()
    model = _mlp(bn=True)
    _, table = recalibrate(model, (x, y), batch_size=64)
    view = recalibration_view("net.py", "digits", table)
    assert view[0] == ("recalibrate: net.py", "bold")
    assert view[1] == (f"data: digits ({table.batches} batches, {table.samples} samples)", "dim")
    rows = view[2]
    assert isinstance(rows, Rows)
    assert [j for _, j in rows.columns] == ["left"] + ["right"] * 6
    assert [r[0] for r in rows.rows] == ["1"] and rows.rows[0][1] == "32"
    assert rows.rows[0][6] == f"0 -> {table.row('1').num_batches_tracked_after}"
