"""The CLI end to end through Typer's CliRunner: reports, exit codes, and every input error as one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from bnaudit.cli import app

runner = CliRunner()

BAD_FILE = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

def build_data():
    return torch.randn(32, 4)

def wrong_width():
    return torch.randn(32, 7)

def empty():
    return torch.utils.data.TensorDataset(torch.zeros(0, 4))

def raises():
    raise RuntimeError("dataset server unreachable")

def returns_string():
    return "model"
"""


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent(BAD_FILE))
    return path


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnaudit: error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_inspect_example_rich_and_json():
    result = run("inspect", "examples/seed_mlp_bn.py", "--width", "120")
    assert result.exit_code == 0, result.output
    assert "BN101 redundant-bias" in result.stdout and "BN104 dropout-before-bn" in result.stdout
    result = run("inspect", "examples/seed_mlp_bn.py", "--format", "json", "--select", "BN1")
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert {f["code"] for f in data["findings"]} == {"BN101", "BN104"}
    assert data["summary"] == {"error": 0, "warning": 3, "info": 0, "total": 3}
    f = data["findings"][0]
    assert set(f) >= {"code", "name", "severity", "layer", "message", "fix", "evidence"}


def test_select_ignore_and_fail_on():
    result = run("inspect", "examples/seed_mlp_bn.py", "-f", "json", "--select", "BN1", "--ignore", "BN101")
    assert [f["code"] for f in json.loads(result.stdout)["findings"]] == ["BN104"]
    result = run("inspect", "examples/seed_mlp_bn.py", "-f", "json", "--select", "dropout-before-bn")
    assert [f["code"] for f in json.loads(result.stdout)["findings"]] == ["BN104"]
    assert run("inspect", "examples/seed_mlp_bn.py", "--select", "BN1", "--fail-on", "warning").exit_code == 1
    assert run("inspect", "examples/seed_mlp_bn.py", "--select", "BN1", "--fail-on", "error").exit_code == 0
    assert run("inspect", "examples/cnn.py", "--select", "BN1", "--fail-on", "info").exit_code == 0
    _one_line_error(run("inspect", "examples/cnn.py", "--select", "BN999"), "matches no rule")
    _one_line_error(run("inspect", "examples/cnn.py", "--fail-on", "loud"), "--fail-on 'loud'")
    _one_line_error(run("inspect", "examples/cnn.py", "--format", "yaml"), "unknown format 'yaml'")


def test_output_file_is_atomic_and_not_overwritten(tmp_path):
    out = tmp_path / "report.json"
    assert run("inspect", "examples/cnn.py", "-f", "json", "-o", out, "--select", "BN1").exit_code == 0
    first = out.read_text()
    assert json.loads(first)["model"] == "examples/cnn.py"
    _one_line_error(run("inspect", "examples/cnn.py", "-f", "json", "-o", out), "already exists; pass --force")
    assert out.read_text() == first
    assert run("inspect", "examples/cnn.py", "-f", "json", "-o", out, "--force", "--select", "BN1").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{tmp}/missing.py"], "not found"),
        (["{bad}:nothing"], "has no model named 'nothing'"),
        (["{bad}:raises"], "building the model raised RuntimeError: dataset server unreachable"),
        (["{bad}:returns_string"], "returned a str, not a torch.nn.Module"),
        (["{bad}", "--data", "{bad}:wrong_width"], "the model rejected the first batch of --data"),
        (["{bad}", "--data", "{bad}:empty"], "the dataset is empty"),
        (["{bad}", "--data", "{bad}:raises"], "building the data raised RuntimeError"),
        (["{bad}", "--weights", "{tmp}/none.pt"], "weights file"),
        (["{bad}", "--data", "random:0x4"], "is not a shape"),
        (["{bad}", "--device", "cuda:7"] if not torch.cuda.is_available() else ["{bad}", "--device", "nonsense"], "--device"),
    ],
)
def test_input_errors_are_one_line_exit_2(bad_file, tmp_path, args, expected):
    argv = ["inspect", *(a.format(tmp=tmp_path, bad=bad_file) for a in args)]
    _one_line_error(run(*argv), expected)


def test_debug_shows_the_exception(bad_file):
    result = runner.invoke(app, ["--debug", "inspect", f"{bad_file}:nothing"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "SpecError"


def test_rules_catalogue_and_doc():
    result = run("rules")
    assert result.exit_code == 0 and "BN101" in result.stdout and "BN110" in result.stdout
    doc = run("rules", "BN104")
    assert doc.exit_code == 0 and "Li, Chen, Hu & Yang" in doc.stdout and "Bad:" in doc.stdout
    assert run("rules", "redundant-bias").stdout.startswith("BN101 redundant-bias")
    catalog = json.loads(run("rules", "--json").stdout)
    assert [r["code"] for r in catalog] == sorted(r["code"] for r in catalog)
    _one_line_error(run("rules", "redundant-bais"), "did you mean 'redundant-bias'")


def test_help_does_not_import_torch():
    code = "import sys; from bnaudit.cli import app; import bnaudit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    help_run = subprocess.run([sys.executable, "-m", "bnaudit", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "inspect" in help_run.stdout


def test_output_file_follows_umask(tmp_path):
    import os

    out = tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        assert run("inspect", "examples/cnn.py", "-f", "json", "-o", out, "--select", "BN1").exit_code == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644
