"""``bnaudit fix`` from the command line, on copies of the shipped examples (the examples themselves are
never edited), and the Fix column of ``bnaudit rules``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnaudit.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


def _example(name: str, tmp_path: Path) -> Path:
    for helper in ("bundled_data.py",):
        shutil.copyfile(EXAMPLES / helper, tmp_path / helper)
    shutil.copyfile(EXAMPLES / name, tmp_path / name)
    return tmp_path / name


def test_diff_on_the_seed_example_shows_the_bn101_edits_and_writes_nothing(tmp_path: Path) -> None:
    path = _example("seed_mlp_bn.py", tmp_path)
    before = path.read_text()
    result = runner.invoke(app, ["fix", str(path), "--diff"])
    assert result.exit_code == 0, result.output
    assert "-            nn.Linear(num_features, 128),\n+            nn.Linear(num_features, 128, bias=False),\n" in result.stdout
    assert "-            nn.Linear(128, 64),\n+            nn.Linear(128, 64, bias=False),\n" in result.stdout
    assert "not applied: BN104 model.3 (line 24) [unsafe]" in result.stderr
    assert "--diff: nothing was written" in result.stderr
    assert path.read_text() == before


def test_fix_that_writes_shows_the_diff_of_what_it_wrote(tmp_path: Path) -> None:
    path = _example("seed_mlp_bn.py", tmp_path)
    result = runner.invoke(app, ["fix", str(path)])
    assert result.exit_code == 0, result.output
    assert "+            nn.Linear(128, 64, bias=False),\n" in result.stdout
    assert "fixed: BN101 model.4 (line 25) [safe]" in result.stdout
    assert "nn.Linear(128, 64, bias=False)," in path.read_text()


@pytest.mark.parametrize(
    ("example", "spec", "codes"),
    [("seed_mlp_bn.py", "", {"BN101"}), ("keras_mlp.py", ":build_model_bn", {"BN101", "BN106"})],
)
def test_fix_then_inspect_shows_the_fixed_findings_gone_and_no_new_ones(
    example: str, spec: str, codes: set[str], tmp_path: Path
) -> None:
    path = _example(example, tmp_path)
    fixed = runner.invoke(app, ["fix", f"{path}{spec}", "--format", "json"])
    assert fixed.exit_code == 0, fixed.output
    payload = json.loads(fixed.stdout)
    assert {o["code"] for o in payload["outcomes"] if o["status"] == "applied"} == codes
    before = {(f["code"], f["layer"]) for f in payload["before"]["findings"]}

    audit = runner.invoke(app, ["inspect", f"{path}{spec}", "--format", "json", "--fail-on", "never"])
    assert audit.exit_code == 0, audit.output
    after = {(f["code"], f["layer"]) for f in json.loads(audit.stdout)["findings"]}
    assert not {code for code, _ in after} & codes
    assert after <= before
    assert (EXAMPLES / example).read_text() != path.read_text()


def test_inspect_fix_reports_the_fixed_model(tmp_path: Path) -> None:
    path = _example("seed_mlp_bn.py", tmp_path)
    result = runner.invoke(app, ["inspect", str(path), "--fix", "--select", "BN101,BN104", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "fixed: BN101 model.0 (line 21) [safe]" in result.stderr
    assert {f["code"] for f in json.loads(result.stdout)["findings"]} == {"BN104"}
    assert "bias=False" in path.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fix", "model.txt"], "bnaudit fix edits a Python file"),
        (["fix", "{tmp}/missing.pt"], "not found"),
        (["fix", "{tmp}/m.py", "-o", "{tmp}/out.pt"], "give the checkpoint with --weights"),
        (["fix", "{tmp}/m.py", "--format", "yaml"], "choose text or json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("from torch import nn\n\n\ndef build_model():\n    return nn.Linear(2, 2)\n")
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_rules_show_the_fix_kind() -> None:
    table = runner.invoke(app, ["rules", "--json"])
    kinds = {r["code"]: r["fix_kind"] for r in json.loads(table.stdout)}
    assert kinds["BN101"] == "safe" and kinds["BN103"] == "unsafe" and kinds["BN302"] == "checkpoint"
    assert kinds["BN110"] is None
    doc = runner.invoke(app, ["rules", "BN104"])
    assert "Automatic fix: unsafe, applied by `bnaudit fix --unsafe-fixes`" in doc.stdout
    assert "Automatic fix: none" in runner.invoke(app, ["rules", "BN110"]).stdout


def test_without_libcst_fix_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "m.py").write_text("from torch import nn\n\n\ndef build_model():\n    return nn.Linear(2, 2)\n")
    monkeypatch.setitem(sys.modules, "libcst", None)  # makes `import libcst` raise ImportError
    result = runner.invoke(app, ["fix", str(tmp_path / "m.py")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "bnaudit: error: bnaudit fix needs LibCST: pip install 'bnaudit[fix]'"
