"""The CI report formats (sarif, junit, github, markdown): golden files, SARIF validated against the 2.1.0
schema, JUnit parsed back, escaping, and the `auto` choice.

Golden reports use rule codes no rule registers (BN9xx) so that the files do not change whenever a real rule's
documentation does; the registry path is covered by the schema test on a real audit. Regenerate the goldens
with ``BNAUDIT_REGEN_GOLDEN=1 python -m pytest tests/report``."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from bnaudit.findings import Finding, Report, sort_findings
from bnaudit.report import FORMATS, render, resolve_format

HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent / "golden"
DATA = HERE.parent / "data"
REGEN = os.environ.get("BNAUDIT_REGEN_GOLDEN") == "1"
CI_FORMATS = ("sarif", "junit", "github", "markdown")


def _finding(code, name, severity, layer, message, audit, **evidence):
    return Finding(code=code, name=name, severity=severity, layer=layer, message=message,
                   fix=f"fix {name} on {layer or 'the model'}", evidence=evidence, audit=audit)


def sample_reports() -> list[Report]:
    """Two audits: one with findings of every severity (a message with characters every format must escape),
    one clean with a skipped rule and no source file."""
    a = [
        _finding("BN901", "biased-linear", "warning", "features.0", "Linear features.0 has a bias | 32 values",
                 "cnn", bias_values=32, threshold=0.123456789),
        _finding("BN901", "biased-linear", "warning", "features.3", "Linear features.3 has a bias: 64, values",
                 "cnn", bias_values=64),
        _finding("BN902", "tiny-batch", "error", None, "batch of 2 gives noisy statistics\n100% of steps",
                 "cnn", batch_size=2),
        _finding("BN903", "eval-drift", "info", "classifier", "drift 0.5 under <eval> & 'train'", "cnn", drift=0.5),
    ]
    cnn = Report(model="cnn", findings=sort_findings(a), graph_method="fx",
                 rules_run=("BN901", "BN902", "BN903"), source_path="models/cnn.py",
                 meta={"audit": "cnn"})
    mlp = Report(model="models/mlp.py:build", findings=(), graph_method="hooks", rules_run=("BN901",),
                 rules_skipped={"BN903": "needs --data"}, source_path=None, meta={"audit": "mlp"})
    return [cnn, mlp]


OPTS = {"fail_on": "warning", "default_uri": "bnaudit.yaml", "tool_version": "0.0.0-test", "root": "."}


@pytest.mark.parametrize("fmt", CI_FORMATS)
def test_golden(fmt):
    ext = {"sarif": "sarif.json", "junit": "junit.xml", "github": "github.txt", "markdown": "md"}[fmt]
    path = GOLDEN / f"ci_formats.{ext}"
    text = render(sample_reports(), fmt, **OPTS)
    if REGEN or not path.exists():
        if not REGEN:
            pytest.fail(f"golden file {path} is missing; run with BNAUDIT_REGEN_GOLDEN=1 to create it")
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_every_ci_format_is_registered_and_renders():
    reports = sample_reports()
    for fmt in CI_FORMATS:
        assert fmt in FORMATS
        # with the default options too, every finding is there by code and layer
        text = render(reports, fmt)
        for f in (f for r in reports for f in r.findings):
            assert f.code in text and (f.layer is None or f.layer in text), (fmt, f.code, f.layer)
    # one entry per finding where the format has them
    assert len(json.loads(render(reports, "sarif"))["runs"][0]["results"]) == 4
    assert sum(line.startswith("::") for line in render(reports, "github").splitlines()) == 4
    assert sum(line.startswith("| :") for line in render(reports, "markdown").splitlines()) == 4  # table rows
    # no audits still gives a well-formed document that says there is nothing
    sarif = json.loads(render([], "sarif"))
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["results"] == [] and sarif["runs"][0]["tool"]["driver"]["rules"] == []
    junit = ET.fromstring(render([], "junit"))
    assert junit.tag == "testsuites" and junit.get("tests") == "0" and junit.get("failures") == "0" and not list(junit)
    assert render([], "github").strip() == "bnaudit: 0 audits: 0 error(s), 0 warning(s), 0 info"
    assert render([], "markdown").strip() == "## bnaudit: 0 errors, 0 warnings, 0 info in 0 audits"


def _sarif_validator():
    schema = json.loads((DATA / "sarif-2.1.0.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    # The schema file must have teeth, or every "validates" below would pass on anything.
    assert not validator.is_valid({"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x"}},
                                                                  "results": [{"message": {"text": "m"}, "level": "fatal"}]}]})
    return validator


def test_sarif_validates_and_carries_locations():
    doc = json.loads(render(sample_reports(), "sarif", **OPTS))
    _sarif_validator().validate(doc)
    run = doc["runs"][0]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["BN901", "BN902", "BN903"]
    results = run["results"]
    assert [r["level"] for r in results] == ["error", "warning", "warning", "note"]
    first = results[1]
    assert first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/cnn.py"
    assert first["locations"][0]["logicalLocations"][0]["name"] == "features.0"
    assert "features.0" in first["message"]["text"]
    # ruleIndex points at the matching descriptor
    for r in results:
        assert run["tool"]["driver"]["rules"][r["ruleIndex"]]["id"] == r["ruleId"]
    # same code+audit+layer -> same fingerprint, whatever the message says
    fps = {r["partialFingerprints"]["bnauditFinding/v1"] for r in results}
    assert len(fps) == len(results)


def test_sarif_edge_cases_stay_valid(tmp_path):
    # A source file outside the root, and a model-wide finding of an audit with no file and no default location.
    outside = tmp_path / "elsewhere" / "model.py"
    far = Report(model="far", findings=sort_findings([
        _finding("BN901", "biased-linear", "warning", "fc", "m", "far"),
        _finding("BN902", "tiny-batch", "info", None, "m", "far"),
    ]), graph_method="fx", rules_run=("BN901", "BN902"), source_path=str(outside), meta={"audit": "far"})
    nowhere = Report(model="nowhere", findings=(_finding("BN902", "tiny-batch", "error", None, "m", "nowhere"),),
                     graph_method="fx", rules_run=("BN902",), source_path=None, meta={"audit": "nowhere"})
    doc = json.loads(render([far, nowhere], "sarif", root=tmp_path / "repo"))
    _sarif_validator().validate(doc)
    results = {(r["properties"]["audit"], r["properties"]["layer"]): r for r in doc["runs"][0]["results"]}
    assert [r["level"] for r in doc["runs"][0]["results"]] == ["warning", "note", "error"]
    uri = results[("far", "fc")]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == outside.as_uri()  # not under the root: an absolute file URI, not a path with ..
    assert "logicalLocations" not in results[("far", None)]["locations"][0]
    assert "locations" not in results[("nowhere", None)]  # nothing to point at: no empty location


def test_sarif_from_a_real_audit_uses_registry_metadata():
    import bnaudit

    report = bnaudit.inspect(str(DATA / "check_models.py") + ":build_bad", input_shape="64", steps=1)
    assert report.findings, "the bad model must produce findings for this test to mean anything"
    doc = json.loads(render([report], "sarif", root=DATA.parent.parent))
    _sarif_validator().validate(doc)
    rules = {r["id"]: r for r in doc["runs"][0]["tool"]["driver"]["rules"]}
    from bnaudit.rules import get_rule

    bn101 = get_rule("BN101")
    assert rules["BN101"]["name"] == bn101.name
    assert rules["BN101"]["shortDescription"]["text"] == bn101.summary
    assert set(report.rules_run) <= set(rules)
    uri = doc["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "tests/data/check_models.py"


def test_junit_parses_back_as_rule_by_audit_matrix():
    root = ET.fromstring(render(sample_reports(), "junit", fail_on="warning"))
    assert root.tag == "testsuites"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"cnn", "mlp"}
    cnn = suites["cnn"]
    cases = {c.get("name"): c for c in cnn.findall("testcase")}
    assert set(cases) == {"BN901 biased-linear", "BN902 tiny-batch", "BN903 eval-drift"}
    # two warnings of one rule: one failing testcase listing both
    failure = cases["BN901 biased-linear"].find("failure")
    assert failure is not None and failure.get("message").startswith("2 findings")
    assert "features.0" in failure.text and "features.3" in failure.text
    # info is below fail_on: passing testcase, finding in system-out
    assert cases["BN903 eval-drift"].find("failure") is None
    assert "classifier" in cases["BN903 eval-drift"].find("system-out").text
    assert (cnn.get("tests"), cnn.get("failures")) == ("3", "2")
    mlp_cases = {c.get("name"): c for c in suites["mlp"].findall("testcase")}
    assert mlp_cases["BN903"].find("skipped").get("message") == "needs --data"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "2", "1")


def test_junit_fail_on_changes_which_testcases_fail():
    root = ET.fromstring(render(sample_reports(), "junit", fail_on="error"))
    assert root.get("failures") == "1"
    root = ET.fromstring(render(sample_reports(), "junit", fail_on="never"))
    assert root.get("failures") == "0"


def test_github_annotations_escape_and_cannot_inject_commands():
    lines = render(sample_reports(), "github", **OPTS).splitlines()
    annotations = [line for line in lines if line.startswith("::")]
    assert len(annotations) == 4
    error = annotations[0]
    assert error.startswith("::error file=models/cnn.py,line=1,title=bnaudit BN902 tiny-batch::")
    # newline and % in the message are escaped, so the annotation stays one line and one command
    assert "noisy statistics%0A100%25 of steps" in error
    # ':' and ',' in a property value would end it early: escaped
    from bnaudit.report.github import escape_property

    assert escape_property("a:b,c") == "a%3Ab%2Cc"
    assert lines[-1] == "bnaudit: 2 audits: 1 error(s), 2 warning(s), 1 info"


def test_markdown_escapes_table_cells():
    md = render(sample_reports(), "markdown", **OPTS)
    assert "has a bias \\| 32 values" in md
    assert "noisy statistics<br>100% of steps" in md
    assert "**Failed** (fail_on: `warning`)" in md
    assert ":white_check_mark: No findings." in md
    # every table row has the same number of unescaped pipes
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert {line.replace("\\|", "").count("|") for line in rows} == {5}


def test_auto_picks_github_in_actions(monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert resolve_format("auto") == "github"
    monkeypatch.delenv("GITHUB_ACTIONS")
    assert resolve_format("auto") != "github"
