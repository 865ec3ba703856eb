"""The CI gate: run_checks on real models (tests/data/check_models.py) and real digits batches, the config's
severities, layer ignores and switches, baselines, and `bnaudit check` / `bnaudit init` exit codes through
Typer's CliRunner."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnaudit.api import run_checks
from bnaudit.cli import app
from bnaudit.errors import ConfigError, SpecError, UsageError, WeightsError
from bnaudit.findings import Finding
from bnaudit.gate import (
    Baseline,
    apply_rule_config,
    load_baseline,
    load_config,
    parse_config,
    render_baseline,
)
from bnaudit.report import FORMAT_CHOICES

DATA = Path(__file__).resolve().parent / "data"
runner = CliRunner()


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A folder with the test models, as a repository using bnaudit would have."""
    shutil.copy(DATA / "check_models.py", tmp_path / "check_models.py")
    shutil.copy(DATA / "check_data.py", tmp_path / "check_data.py")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD = "audits:\n  - name: bad\n    model: check_models.py:build_bad\n    input_shape: [64]\n"
CLEAN = "audits:\n  - name: clean\n    model: check_models.py:build_clean\n    input_shape: [64]\n"


def cfg(project: Path, text: str):
    return load_config(write(project / "bnaudit.yaml", text))


def bn101_layers(result):
    return sorted(f.layer for f in result.findings if f.code == "BN101")


def test_bad_model_fails_at_warning_and_passes_at_error(project):
    result = run_checks(cfg(project, "fail_on: warning\n" + BAD))
    assert bn101_layers(result) == ["0", "3"]
    assert all(f.audit == "bad" for f in result.findings)
    assert result.failed and result.exit_code == 1
    assert "fail_on=warning: FAILED" in result.summary()
    passed = run_checks(cfg(project, "fail_on: error\n" + BAD))
    assert not passed.failed and passed.exit_code == 0


def test_clean_model_passes_even_when_strict(project):
    result = run_checks(cfg(project, "extends: strict\n" + CLEAN))
    assert result.findings == () and result.exit_code == 0


def test_severity_override_ignore_glob_and_switch(project):
    escalated = run_checks(cfg(project, "rules:\n  BN101: error\n" + BAD))
    assert {f.severity for f in escalated.findings if f.code == "BN101"} == {"error"}
    assert escalated.failed  # default preset fails on errors
    ignored = run_checks(cfg(project, "rules:\n  BN101: {ignore: ['0']}\n" + BAD))
    assert bn101_layers(ignored) == ["3"]
    globbed = run_checks(cfg(project, "rules:\n  BN101: {ignore: ['*']}\n" + BAD))
    assert bn101_layers(globbed) == []
    off = run_checks(cfg(project, "rules:\n  BN101: off\n" + BAD))
    assert bn101_layers(off) == [] and "BN101" not in off.reports[0].rules_run
    selected = run_checks(cfg(project, "rules:\n  select: [BN103]\n" + BAD))
    assert selected.reports[0].rules_run == ("BN103",)


def test_cli_flags_override_the_file(project):
    base = cfg(project, "fail_on: warning\n" + BAD + CLEAN.replace("audits:\n", ""))
    result = run_checks(base.override(fail_on="error", audits=["clean"]))
    assert [r.model for r in result.reports] == ["clean"] and not result.failed


def test_audit_with_real_data(project):
    text = ("audits:\n  - name: bad\n    model: check_models.py:build_bad\n    data: check_data.py:build_data\n"
            "    batch_size: 32\n    steps: 1\n")
    result = run_checks(cfg(project, text))
    assert bn101_layers(result) == ["0", "3"]
    assert result.reports[0].meta["audit"] == "bad"


def test_baseline_accepts_known_findings_and_counts_duplicates(project):
    config = cfg(project, "fail_on: warning\n" + BAD)
    first = run_checks(config)
    baseline = Baseline.from_reports(first.reports)
    again = run_checks(config, baseline=baseline)
    assert again.findings == () and len(again.accepted) == 2 and not again.failed
    assert "2 accepted by the baseline" in again.summary()
    # one accepted BN101 on layer 0 does not cover the one on layer 3
    partial = run_checks(config, baseline=Baseline((("BN101", "bad", "0"),)))
    assert bn101_layers(partial) == ["3"] and partial.failed
    # an entry that no longer matches is reported as stale, not an error
    stale = run_checks(config, baseline=Baseline((*baseline.entries, ("BN104", "bad", "7"))))
    assert stale.stale == 1 and not stale.failed


def test_baseline_file_roundtrip_matches_by_code_audit_layer(project):
    config = cfg(project, BAD)
    text = render_baseline(run_checks(config).reports)
    doc = json.loads(text)
    # reworded messages must still match: the message is informational only
    for row in doc["findings"]:
        row["message"] = "reworded in a later version"
    write(project / "base.json", json.dumps(doc))
    loaded = load_baseline(project / "base.json")
    assert sorted(loaded.entries) == [("BN101", "bad", "0"), ("BN101", "bad", "3")]
    via_config = run_checks(cfg(project, "baseline: base.json\nfail_on: info\n" + BAD))
    assert via_config.findings == () and len(via_config.accepted) == 2
    ignored = run_checks(cfg(project, "baseline: base.json\nfail_on: info\n" + BAD), use_baseline=False)
    assert len(ignored.findings) == 2


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, UsageError, "baseline {p} not found; create it with `bnaudit check --write-baseline {p}`"),
        ("{not json", ConfigError, "{p}: not a bnaudit baseline"),
        ('{"bnaudit_baseline": 9, "findings": []}', ConfigError,
         "{p}: not a version-1 bnaudit baseline; rewrite it with --write-baseline"),
        ('{"bnaudit_baseline": 1, "findings": [{"layer": "x"}]}', ConfigError,
         "{p}: findings[0] needs a 'code'; rewrite it with --write-baseline"),
    ],
)
def test_bad_baseline_files(tmp_path, content, error, message):
    p = tmp_path / "base.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(error) as err:
        load_baseline(p)
    assert str(err.value).startswith(message.format(p=p))


def test_input_errors_name_the_audit(project):
    config = cfg(project, "audits:\n  - name: broken\n    model: missing.py:build\n")
    with pytest.raises(SpecError, match=r": audit 'broken': missing\.py:build: file missing\.py not found"):
        run_checks(config)
    with pytest.raises(UsageError, match=r"^no audits in .*bnaudit\.yaml; add one under audits:"):
        run_checks(cfg(project, "fail_on: warning\n"))


@pytest.mark.parametrize(
    ("entry", "where", "error", "problem"),
    [
        ("  - name: broken\n    model: missing.py:build\n", "3: audits[0].model", SpecError,
         "audit 'broken': missing.py:build: file missing.py not found"),
        ("  - name: nodata\n    model: check_models.py:build_bad\n    data: gone.py:build_data\n",
         "4: audits[0].data", SpecError, "audit 'nodata': gone.py:build_data: file gone.py not found"),
        ("  - name: nofile\n    model: check_models.py:build_bad\n    data: batches.pt\n",
         "4: audits[0].data", SpecError, "audit 'nofile': batches.pt: file batches.pt not found"),
        # the data spec's text contains the model's: still the data's line
        ("  - model: check_models.py:build_bad\n    data: check_models.py:build_bad_data\n", "3: audits[0].data",
         SpecError, "audit 'check_models.py:build_bad': "),
        ("  - name: noweights\n    model: check_models.py:build_bad\n    weights: gone.pt\n",
         "4: audits[0].weights", WeightsError, "audit 'noweights': weights file gone.pt not found"),
        ("  - missing.py\n", "2: audits[0]", SpecError, "audit 'missing.py': missing.py: file missing.py not found"),
    ],
)
def test_input_errors_point_at_the_config_line(project, entry, where, error, problem):
    # A missing file is found only when the audit runs, but it is the config's line that needs fixing.
    config = cfg(project, "fail_on: warning\naudits:\n  - name: fine\n    model: check_models.py:build_clean\n"
                          "    input_shape: [64]\n" + entry.replace("audits[0]", "audits[1]"))
    line, key = where.split(": ")
    expected = f"{project / 'bnaudit.yaml'}:{int(line) + 4}: {key.replace('[0]', '[1]')}: {problem}"
    with pytest.raises(error) as err:
        run_checks(config)
    assert str(err.value).startswith(expected), str(err.value)


def test_input_error_in_an_extended_file_points_there(project):
    write(project / "base.yaml", "audits:\n  - name: broken\n    model: check_models.py:build_bad\n"
                                 "    data: nope.py\n")
    config = cfg(project, "extends: base.yaml\nfail_on: info\n")
    with pytest.raises(SpecError) as err:
        run_checks(config)
    assert str(err.value).startswith(f"{project / 'base.yaml'}:4: audits[0].data: audit 'broken': nope.py: ")


def test_apply_rule_config_is_idempotent():
    f = Finding("BN101", "redundant-bias", "warning", "features.0", "m", "fix", audit="a")
    g = Finding("BN101", "redundant-bias", "warning", None, "model-wide", "fix", audit="a")
    rc = {"BN101": {"severity": "error", "ignore": ["classifier.*"], "options": {}}}
    once = apply_rule_config([f, g], rc)
    assert [x.severity for x in once] == ["error", "error"]
    assert apply_rule_config(once, rc) == once
    assert apply_rule_config([f, g], {"BN101": {"ignore": ["features.*"]}}) == [g]  # None layer never matches


def test_config_paths_are_relative_to_the_config_file(project, monkeypatch):
    sub = project / "ci"
    sub.mkdir()
    write(sub / "bnaudit.yaml", "audits:\n  - model: ../check_models.py:build_bad\n    input_shape: [64]\n")
    monkeypatch.chdir(sub.parent.parent)  # run from somewhere else entirely
    result = run_checks(load_config(sub / "bnaudit.yaml"))
    assert bn101_layers(result) == ["0", "3"]


# ------------------------------------------------------------------------------------------------ CLI
def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_cli_exit_codes(project):
    write(project / "bnaudit.yaml", "fail_on: warning\n" + BAD)
    failed = invoke("check", "--format", "json")
    assert failed.exit_code == 1, failed.output
    doc = json.loads(failed.stdout)
    assert doc["check"] == {"fail_on": "warning", "failed": True, "accepted": 0, "stale_baseline_entries": 0}
    assert [f["layer"] for f in doc["reports"][0]["findings"]] == ["0", "3"]
    assert "FAILED" in failed.stderr
    assert invoke("check", "--fail-on", "error", "-f", "json").exit_code == 0
    assert invoke("check", "--fail-on", "never", "-f", "json").exit_code == 0
    assert invoke("check", "--ignore", "BN101", "-f", "json").exit_code == 0

    write(project / "clean.yaml", "extends: strict\n" + CLEAN)
    assert invoke("check", "--config", "clean.yaml", "-f", "json").exit_code == 0


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({}, ("check",), "bnaudit: error: no bnaudit.yaml in this folder; run `bnaudit init` to write one, or pass "
                         "--config FILE"),
        ({"bnaudit.yaml": "fail_on: warn\n"}, ("check",),
         "bnaudit: error: bnaudit.yaml:1: fail_on: must be one of error, warning, info, never, got 'warn' "
         "(did you mean 'warning'?)"),
        ({"bnaudit.yaml": BAD}, ("check", "--fail-on", "loud"),
         "bnaudit: error: --fail-on 'loud': choose one of error, warning, info, never"),
        ({"bnaudit.yaml": BAD}, ("check", "--format", "xml"),
         f"bnaudit: error: unknown format 'xml'; choose one of {', '.join(FORMAT_CHOICES)}"),
        ({"bnaudit.yaml": BAD}, ("check", "--select", "redundant-bais"),
         "bnaudit: error: --select 'redundant-bais' matches no rule (did you mean 'redundant-bias'?); `bnaudit rules` "
         "lists them"),
        ({"bnaudit.yaml": BAD}, ("check", "--baseline", "nope.json"),
         "bnaudit: error: baseline nope.json not found; create it with `bnaudit check --write-baseline nope.json`"),
        ({"bnaudit.yaml": "audits:\n  - model: gone.py:build\n"}, ("check",),
         "bnaudit: error: bnaudit.yaml:2: audits[0].model: audit 'gone.py:build': gone.py:build: file gone.py not "
         "found"),
        ({"bnaudit.yaml": "audits:\n  - name: a\n    model: check_models.py:build_bad\n    data: gone.npz\n"},
         ("check",), "bnaudit: error: bnaudit.yaml:4: audits[0].data: audit 'a': gone.npz: file gone.npz not found"),
    ],
)
def test_cli_input_errors_exit_2_with_one_line(project, files, args, message):
    for name, text in files.items():
        write(project / name, text)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)
    assert "Traceback" not in result.output


def test_cli_outputs_and_baseline_workflow(project):
    write(project / "bnaudit.yaml", "fail_on: warning\n" + BAD + "outputs:\n  - {format: sarif, path: out.sarif}\n"
          "  - {format: junit, path: junit.xml}\n  - {format: markdown, path: summary.md}\n")
    first = invoke("check", "-f", "github")
    assert first.exit_code == 1
    # line 14: the nn.Linear inside build_bad's nn.Sequential(...) that BN101 is about
    assert first.stdout.startswith("::warning file=check_models.py,line=14,title=bnaudit BN101 redundant-bias::")
    sarif = json.loads((project / "out.sarif").read_text())
    assert len(sarif["runs"][0]["results"]) == 2
    junit = ET.parse(project / "junit.xml").getroot()
    assert junit.get("failures") == "1"
    assert "BN101" in (project / "summary.md").read_text()
    # outputs are declared artifacts: a rerun replaces them
    assert invoke("check", "-f", "json").exit_code == 1

    wrote = invoke("check", "--write-baseline", "base.json")
    assert wrote.exit_code == 0 and "2 findings accepted" in wrote.stderr
    assert invoke("check", "--write-baseline", "base.json").exit_code == 2  # exists, no --force
    assert invoke("check", "--write-baseline", "base.json", "--force").exit_code == 0
    gated = invoke("check", "--baseline", "base.json", "-f", "json")
    assert gated.exit_code == 0, gated.output
    assert json.loads(gated.stdout)["check"]["accepted"] == 2
    assert invoke("check", "--baseline", "base.json", "--no-baseline").exit_code == 2

    # a new mistake in the model is caught despite the baseline (a new file: modules are imported once)
    models = (project / "check_models.py").read_text()
    write(project / "check_models_v2.py", models.replace(
        "nn.Linear(16, 10),", "nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 10),"))
    write(project / "bnaudit.yaml", "fail_on: warning\n" + BAD.replace("check_models.py", "check_models_v2.py"))
    new = invoke("check", "--baseline", "base.json", "-f", "json")
    assert new.exit_code == 1
    assert [f["layer"] for f in json.loads(new.stdout)["reports"][0]["findings"]] == ["6"]


def test_cli_output_file_refuses_overwrite(project):
    write(project / "bnaudit.yaml", BAD)
    assert invoke("check", "-f", "sarif", "-o", "r.sarif").exit_code == 0
    assert json.loads((project / "r.sarif").read_text())["version"] == "2.1.0"
    again = invoke("check", "-f", "sarif", "-o", "r.sarif")
    assert again.exit_code == 2 and "r.sarif already exists; pass --force" in again.stderr


def test_init_writes_a_valid_starter(project):
    result = invoke("init")
    assert result.exit_code == 0 and (project / "bnaudit.yaml").exists()
    assert parse_config((project / "bnaudit.yaml").read_text()).extends == ("default",)
    assert invoke("init").exit_code == 2
    assert invoke("init", "--preset", "strict", "--force").exit_code == 0
    assert load_config(project / "bnaudit.yaml").fail_on == "warning"
    bad = invoke("init", "other.yaml", "--preset", "lax")
    assert bad.exit_code == 2 and "no preset 'lax'" in bad.stderr
