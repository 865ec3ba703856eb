"""Every API function takes objects or specs and returns what the CLI renders: for inspect, insert_bn,
fold_bn, swap_norm, recalibrate, train_compare and check, the result from spec strings, the result from live
objects (the module and data the specs name) and the CLI's JSON or written file agree. Real example models
on the bundled digits data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bnaudit
from bnaudit.cli import app
from bnaudit.loading import load_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = Path(__file__).resolve().parents[1] / "data"
MLP = str(EXAMPLES / "seed_mlp.py")
MLP_BN = str(EXAMPLES / "seed_mlp_bn.py")
runner = CliRunner()


def _cli(*args: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code in (0, 1), res.output
    return res.stdout


def _findings(report: dict) -> list[tuple]:
    return [(f["code"], f["layer"], f["message"]) for f in report["findings"]]


def _objects(spec: str) -> tuple[torch.nn.Module, object]:
    """The module and the data object the spec's file builds, as a user would hold them."""
    loaded = load_model(spec)
    return loaded.module, loaded.namespace.build_data()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_inspect_objects_specs_and_cli_agree():
    cli = json.loads(_cli("inspect", MLP_BN, "--data", f"{MLP_BN}:build_data", "--steps", "2", "--format", "json"))
    spec = bnaudit.inspect(MLP_BN, f"{MLP_BN}:build_data", steps=2).to_dict()
    model, data = _objects(MLP_BN)
    obj = bnaudit.inspect(model, data, steps=2).to_dict()
    assert _findings(cli) == _findings(spec) == _findings(obj)
    assert {"BN101", "BN104"} <= {f[0] for f in _findings(cli)}


@pytest.mark.parametrize(
    ("command", "function", "spec", "cli_args", "kwargs"),
    [
        ("insert-bn", "insert_bn", MLP, ["--input-shape", "64"], {"input_shape": "64"}),
        ("swap-norm", "swap_norm", MLP_BN, ["--to", "group", "--input-shape", "64"], {"to": "group", "input_shape": "64"}),
        ("fold-bn", "fold_bn", MLP_BN, ["--eval", "--input-shape", "64"], {"eval_mode": True, "input_shape": "64"}),
    ],
)
def test_transforms_objects_specs_and_cli_agree(tmp_path, command, function, spec, cli_args, kwargs):
    out = tmp_path / "out.pt"
    _cli(command, spec, *cli_args, "-o", out)
    written = bnaudit.transforms.load(out)
    fn = getattr(bnaudit, function)
    from_spec = fn(spec, **kwargs)
    model, _ = _objects(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from_object = fn(model, **kwargs)
    assert [c.layer for c in from_spec.changes] == [c.layer for c in from_object.changes]
    assert from_spec.changes, "the transform changed nothing: the comparison would be empty"
    _same_state(written, from_spec.model)
    _same_state(written, from_object.model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched


def test_recalibrate_objects_specs_and_cli_agree(tmp_path):
    out = tmp_path / "recal.pt"
    _cli("recalibrate", MLP_BN, "--data", f"{MLP_BN}:build_data", "-n", "3", "-o", out)
    written = bnaudit.transforms.load(out)
    new_spec, table_spec = bnaudit.recalibrate(MLP_BN, f"{MLP_BN}:build_data", batches=3)
    model, data = _objects(MLP_BN)
    new_obj, table_obj = bnaudit.recalibrate(model, data, batches=3)
    _same_state(written, new_spec)
    _same_state(new_spec, new_obj)
    assert [r.z_after for r in table_spec] == [r.z_after for r in table_obj]
    assert table_spec.batches == 3


def test_train_compare_objects_specs_and_cli_agree():
    spec = str(EXAMPLES / "deep_sigmoid_digits.py")
    opts = {"lrs": [2.0], "steps": 8, "seeds": 1, "threads": 1, "record": False}
    cli = json.loads(_cli("train-compare", spec, "--lr", "2", "--steps", "8", "--seeds", "1", "--threads", "1",
                          "--no-record", "--format", "json"))
    from_spec = bnaudit.train_compare(spec, **opts)
    model, data = _objects(spec)
    from_object = bnaudit.train_compare(model, data, **opts)
    losses = [r["losses"] for r in cli["runs"]]
    assert losses == [r["losses"] for r in json.loads(from_spec.to_json())["runs"]]
    assert losses == [r["losses"] for r in json.loads(from_object.to_json())["runs"]]
    assert len(losses) == 2 and all(len(x) == 8 for x in losses)
    assert from_spec.settings["model"] == cli["settings"]["model"] == spec


def test_check_dict_file_and_cli_agree(tmp_path, monkeypatch):
    shutil.copy(DATA / "check_models.py", tmp_path / "check_models.py")
    monkeypatch.chdir(tmp_path)
    config = {"fail_on": "warning",
              "audits": [{"name": "bad", "model": "check_models.py:build_bad", "input_shape": [64]}]}
    (tmp_path / "bnaudit.yaml").write_text(
        "fail_on: warning\naudits:\n  - name: bad\n    model: check_models.py:build_bad\n    input_shape: [64]\n"
    )
    res = runner.invoke(app, ["check", "--format", "json"])
    assert res.exit_code == 1, res.output
    cli = json.loads(res.stdout)
    from_file = bnaudit.check("bnaudit.yaml")
    from_dict = bnaudit.check(config)
    assert from_file.failed and from_dict.failed and cli["check"]["failed"]
    cli_findings = [(f["code"], f["layer"], f["message"]) for r in cli["reports"] for f in r["findings"]] \
        if "reports" in cli else _findings(cli)
    assert cli_findings == [(f.code, f.layer, f.message) for f in from_file.findings]
    assert [(f.code, f.layer) for f in from_file.findings] == [(f.code, f.layer) for f in from_dict.findings]
    assert bnaudit.check(config, fail_on="error").exit_code == (1 if any(
        f.severity == "error" for f in from_dict.findings) else 0)
