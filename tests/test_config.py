"""bnaudit.yaml: parsing, presets and precedence, every malformed-config message verbatim, and fuzzing that
proves no config text ever escapes as anything but a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnaudit.errors import ConfigError
from bnaudit.findings import FAIL_ON_CHOICES, SEVERITIES
from bnaudit.gate import (
    AuditSpec,
    Config,
    find_config,
    load_config,
    parse_config,
    preset_names,
    starter_config,
)
from bnaudit.report import FORMATS

FULL = """\
extends: strict
fail_on: info
rules:
  select: [BN1]
  ignore: BN102
  BN106: {severity: error, options: {max_momentum: 1}, ignore: ["features.*"]}
  BN1: warning
  BN110: off
  redundant-bias:
    enabled: true
audits:
  - name: mlp
    model: check_models.py:build_bad
    data: check_models.py:build_data
    batch_size: 64
    steps: 2
    input_shape: 3x32x32
  - random:3x32x32
outputs:
  - {format: sarif, path: out/bnaudit.sarif}
  - {format: junit, path: junit.xml, overwrite: false}
baseline: accepted.json
"""


def test_full_config_parses_with_types_and_paths(tmp_path):
    (tmp_path / "check_models.py").write_text("")
    cfg_path = tmp_path / "bnaudit.yaml"
    cfg_path.write_text(FULL)
    cfg = load_config(cfg_path)
    assert cfg.fail_on == "info"  # the file beats the strict preset's warning
    assert cfg.extends == ("default", "strict")
    assert cfg.select == ("BN1",) and cfg.ignore == ("BN102",)
    bn106 = cfg.rules["BN106"]
    assert bn106.severity == "error" and bn106.ignore == ("features.*",)
    assert bn106.options == {"max_momentum": 1.0} and isinstance(bn106.options["max_momentum"], float)
    assert cfg.rules["BN110"].enabled is False
    mlp, rnd = cfg.audits
    # file specs are rebased onto the config's folder; non-file specs are left alone
    assert mlp.model == f"{tmp_path.as_posix()}/check_models.py:build_bad"
    assert (mlp.batch_size, mlp.steps, mlp.input_shape, mlp.line) == (64, 2, (3, 32, 32), 12)
    assert rnd == AuditSpec(name="random:3x32x32", model="random:3x32x32", line=18)
    assert cfg.outputs[0].path == tmp_path / "out/bnaudit.sarif" and cfg.outputs[0].overwrite
    assert cfg.outputs[1].overwrite is False
    assert cfg.baseline == tmp_path / "accepted.json"


def test_rule_config_prefix_then_exact_code():
    cfg = parse_config(FULL)
    rc = cfg.rule_config()
    assert rc["BN106"]["severity"] == "error"  # exact code beats the BN1 prefix
    assert rc["BN106"]["options"] == {"max_momentum": 1.0}
    assert rc["BN103"]["severity"] == "warning"  # from the prefix
    assert rc["BN109"]["severity"] == "warning"  # an error rule demoted by the prefix on purpose
    select, ignore = cfg.selection()
    assert select == ["BN1", "redundant-bias"]
    assert ignore == ["BN102", "BN110"]


def test_enabled_true_overrides_a_prefix_or_glob_ignore():
    # `enabled: true` on one rule wins over a broader ignore: the prefix is replaced by the codes it covers,
    # less the rule switched on; an ignore that does not cover it is left alone.
    from bnaudit.rules.base import select_rules

    cfg = parse_config("rules:\n  ignore: [BN3, BN10*, BN201]\n  BN307: {enabled: true}\n  BN104: {enabled: true}\n")
    select, ignore = cfg.selection()
    chosen = {r.code for r in select_rules(select or None, ignore or None)}
    assert {"BN307", "BN104"} <= chosen
    assert not chosen & {"BN301", "BN306", "BN101", "BN109", "BN201"}
    assert "BN201" in ignore and "BN3" not in ignore and "BN10*" not in ignore
    # without the switch the prefix still ignores the whole family
    plain = parse_config("rules:\n  ignore: [BN3]\n").selection()
    assert not {r.code for r in select_rules(None, plain[1])} & {"BN301", "BN307"}


def test_presets_ship_and_strict_extends_default():
    assert preset_names() == ["default", "strict"]
    assert parse_config("extends: default\n").fail_on == "error"
    assert parse_config("extends: strict\n").fail_on == "warning"
    assert parse_config("").fail_on == "error"  # an empty file is the default preset
    assert parse_config("# just a comment\n").audits == ()


def test_extends_a_file_merges_rules_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "extends: strict\nrules:\n  BN101: {severity: error, ignore: [head]}\n  BN103: info\n"
        "audits:\n  - model: base.py:build\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrules:\n  BN101: {ignore: [stem.*]}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.fail_on == "warning"
    assert cfg.extends == ("default", "strict", "base.yaml")
    # the per-rule mapping merges: severity from the base, ignore replaced by the child
    assert cfg.rules["BN101"].severity == "error" and cfg.rules["BN101"].ignore == ("stem.*",)
    assert cfg.rules["BN103"].severity == "info"
    assert [a.model for a in cfg.audits] == ["base.py:build"]


def test_extends_errors_name_the_file_they_are_in(tmp_path):
    (tmp_path / "base.yaml").write_text("rules:\n  BN101:\n    severity: loud\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "child.yaml")
    assert str(err.value) == (f"{tmp_path / 'base.yaml'}:3: rules.BN101.severity: must be one of error, warning, "
                              "info, got 'loud'")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml:1: extends: 'a\.yaml' extends itself in a cycle"):
        load_config(tmp_path / "a.yaml")


def test_override_is_the_cli_layer():
    cfg = parse_config(FULL)
    over = cfg.override(fail_on="never", select=["BN101"], ignore=["BN105"], audits=["mlp"], baseline="b.json")
    assert over.fail_on == "never" and over.select == ("BN101",)
    assert over.ignore == ("BN102", "BN105")
    assert [a.name for a in over.audits] == ["mlp"] and over.baseline == Path("b.json")
    assert cfg.fail_on == "info"  # the original is untouched
    with pytest.raises(ConfigError, match=r"--audit 'mpl' is not an audit in bnaudit\.yaml \(did you mean 'mlp'\?\)"):
        cfg.override(audits=["mpl"])
    with pytest.raises(ConfigError, match="--fail-on 'loud' is not one of error, warning, info, never"):
        cfg.override(fail_on="loud")


MALFORMED = [
    ("fial_on: warning\n", "bnaudit.yaml:1: fial_on: unknown key (did you mean 'fail_on'?)"),
    ("audits: []\nzzz: 1\n",
     "bnaudit.yaml:2: zzz: unknown key (known: extends, fail_on, rules, audits, outputs, baseline)"),
    ("fail_on: critical\n", "bnaudit.yaml:1: fail_on: must be one of error, warning, info, never, got 'critical'"),
    ("fail_on: [error]\n", "bnaudit.yaml:1: fail_on: must be one of error, warning, info, never, got a list"),
    ("rules: [BN101]\n", "bnaudit.yaml:1: rules: must be a mapping of rule settings, got a list"),
    ("rules:\n  redundant-bais: error\n",
     "bnaudit.yaml:2: rules.redundant-bais: unknown key: no rule or family 'redundant-bais' (did you mean "
     "'redundant-bias'?); `bnaudit rules` lists them"),
    ("rules:\n  BN999: error\n",
     "bnaudit.yaml:2: rules.BN999: unknown key: no rule or family 'BN999'"),
    ("rules:\n  select: [BN1, redundnt-bias]\n",
     "bnaudit.yaml:2: rules.select[1]: 'redundnt-bias' matches no rule (did you mean 'redundant-bias'?); "
     "`bnaudit rules` lists them"),
    ("rules:\n  selct: [BN1]\n",
     "bnaudit.yaml:2: rules.selct: unknown key: no rule or family 'selct' (did you mean 'select'?); "
     "`bnaudit rules` lists them"),
    ("rules:\n  BN101:\n    severity: fatal\n",
     "bnaudit.yaml:3: rules.BN101.severity: must be one of error, warning, info, got 'fatal'"),
    ("rules:\n  BN101:\n    severty: error\n",
     "bnaudit.yaml:3: rules.BN101.severty: unknown key (did you mean 'severity'?)"),
    ("rules:\n  BN106:\n    options:\n      max_momentm: 0.3\n",
     "bnaudit.yaml:4: rules.BN106.options.max_momentm: BN106 has no option 'max_momentm' (options: max_momentum)"),
    ("rules:\n  BN106:\n    options:\n      max_momentum: high\n",
     "bnaudit.yaml:4: rules.BN106.options.max_momentum: BN106 option 'max_momentum' must be float, got 'high'"),
    ("rules:\n  BN102:\n    options:\n      placement: sideways\n",
     "bnaudit.yaml:4: rules.BN102.options.placement: BN102 option 'placement' must be one of "
     "['before-activation', 'after-activation', 'any'], got 'sideways'"),
    ("rules:\n  BN101:\n    ignore: [features.*, 3]\n",
     "bnaudit.yaml:3: rules.BN101.ignore[1]: must be a layer glob, got 3"),
    ("audits:\n  model: m.py:build\n",
     "bnaudit.yaml:1: audits: must be a list of audits (start each with '- model: ...'), got a mapping"),
    ("audits:\n  - name: a\n    data: d.py:build\n",
     "bnaudit.yaml:2: audits[0]: missing key 'model' (a spec such as model.py:build_model)"),
    ("audits:\n  - model: m.py:build\n    batchsize: 64\n",
     "bnaudit.yaml:3: audits[0].batchsize: unknown key (did you mean 'batch_size'?)"),
    ("audits:\n  - model: m.py:build\n    batch_size: 0\n",
     "bnaudit.yaml:3: audits[0].batch_size: must be a positive integer, got 0"),
    ("audits:\n  - model: m.py:build\n    steps: yes\n",
     "bnaudit.yaml:3: audits[0].steps: must be a positive integer, got true"),
    ("audits:\n  - model: m.py:build\n  - model: m.py:build\n",
     "bnaudit.yaml:3: audits[1]: audit name 'm.py:build' is used twice (first at audits[0]); give each audit "
     "its own name"),
    ("audits:\n  - model: m.py:build\n    trust_pickle: 'yes'\n",
     "bnaudit.yaml:3: audits[0].trust_pickle: must be true or false, got 'yes'"),
    ("outputs:\n  - format: sarif\n", "bnaudit.yaml:2: outputs[0]: missing key 'path'"),
    ("outputs:\n  - {format: sarf, path: out.sarif}\n",
     f"bnaudit.yaml:2: outputs[0].format: must be one of {', '.join(FORMATS)}, got 'sarf' (did you mean 'sarif'?)"),
    ("extends: default\nfail_on: loud\n",  # the preset's own fail_on (its line 3) is not where the mistake is
     "bnaudit.yaml:2: fail_on: must be one of error, warning, info, never, got 'loud'"),
    ("extends: strikt\n",
     "bnaudit.yaml:1: extends: no preset 'strikt' (did you mean 'strict'?); presets are default, strict, or give "
     "a .yaml file"),
    ("rules:\n  BN101: {severity: error\n",
     "bnaudit.yaml:3: invalid YAML: expected ',' or '}', but got '<stream end>'"),
    ("rules:\n\tBN101: error\n", "bnaudit.yaml:2: invalid YAML: found character '\\t' that cannot start any token"),
    ("fail_on: error\nfail_on: warning\n", "bnaudit.yaml:2: fail_on: duplicate key (first at line 1)"),
    ("- model: m.py:build\n",
     "bnaudit.yaml:1: the config must be a mapping of keys (fail_on:, rules:, audits:...), got a list"),
    ("fail_on: !!python/name:os.system\n",
     "bnaudit.yaml:1: invalid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/name:os.system'"),
    ("audits:\n  - model: m.py:build\n    name: 2020-13-45\n",
     "bnaudit.yaml:3: audits[0].name: invalid value (month must be in 1..12)"),
    ("fail_on: error\n---\nfail_on: info\n", "bnaudit.yaml:2: several YAML documents in one file; keep one"),
    ("a: &a [*a]\n", "bnaudit.yaml:1: the document is nested too deeply or too large"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[m.split(": ", 2)[1] for _, m in MALFORMED])
def test_malformed_config_exact_message(text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    if text.startswith("rules:\n  BN999"):
        # the did-you-mean for an unknown code depends on which codes exist; the rest is exact
        assert str(err.value).startswith(message) and str(err.value).endswith("`bnaudit rules` lists them")
    else:
        assert str(err.value) == message


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found; run `bnaudit init`"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"fail_on: \xe9rror\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_find_config(tmp_path, monkeypatch):
    assert find_config(tmp_path) is None
    (tmp_path / "bnaudit.yml").write_text("")
    assert find_config(tmp_path) == tmp_path / "bnaudit.yml"
    monkeypatch.chdir(tmp_path)
    assert find_config(".") == Path("bnaudit.yml")


@pytest.mark.parametrize("preset", ["default", "strict"])
def test_starter_config_is_valid_and_commented(preset):
    text = starter_config(preset)
    cfg = parse_config(text)
    assert cfg.extends[-1] == preset
    assert [a.model for a in cfg.audits] == ["model.py:build_model"]
    assert text.count("\n#") > 5
    with pytest.raises(ConfigError, match="no preset 'lax'"):
        starter_config("lax")


# ---------------------------------------------------------------------------------------------- fuzzing
def _check_never_crashes(text: str) -> Config | None:
    """Parse ``text``: a one-line ConfigError naming the file, or a Config whose every value is one the
    validator allows (so a check that let a bad value through fails here)."""
    try:
        cfg = parse_config(text)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip() or "invalid YAML" in message
        assert message.startswith("bnaudit.yaml")
        return None
    assert cfg.fail_on in FAIL_ON_CHOICES
    assert cfg.extends[:1] in ((), ("default",)) and set(cfg.extends) <= {"default", "strict"}
    for key, rule in cfg.rules.items():
        assert isinstance(key, str) and key not in ("select", "ignore")
        assert rule.severity is None or rule.severity in SEVERITIES
        assert rule.enabled in (None, True, False) and all(isinstance(g, str) and g for g in rule.ignore)
    for audit in cfg.audits:
        assert isinstance(audit.model, str) and audit.model and isinstance(audit.name, str) and audit.name
        assert audit.batch_size >= 1 and audit.steps >= 1 and audit.line >= 1 and isinstance(audit.trust_pickle, bool)
        assert audit.input_shape is None or (audit.input_shape and min(audit.input_shape) >= 1)
        assert audit.where().startswith(f"bnaudit.yaml:{audit.line}: audits[")  # where its load errors point
    assert len({a.name for a in cfg.audits}) == len(cfg.audits)
    assert all(o.format in FORMATS and isinstance(o.overwrite, bool) for o in cfg.outputs)
    return cfg


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("abBN10-_:{}[],'\"&*!|>#%@`\n\t -.?~")) | st.characters(), max_size=120))
def test_fuzz_arbitrary_text(text):
    _check_never_crashes(text)


KEYS = st.sampled_from(
    ["extends", "fail_on", "rules", "audits", "outputs", "baseline", "select", "ignore", "BN101", "BN1",
     "severity", "options", "enabled", "model", "name", "batch_size", "steps", "input_shape", "format", "path",
     "max_momentum", "placement", "device", "weights", "trust_pickle", "fial_on", "<<"]
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=True), st.sampled_from(
        ["error", "warning", "info", "never", "default", "strict", "sarif", "BN1", "BN101", "m.py:build", "3x32",
         "features.*", "x.yaml", "", "before-activation"]),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=20)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzz_structured_configs(doc):
    # Shaped like real configs, so the validator (not just the YAML parser) is what gets exercised.
    cfg = _check_never_crashes(yaml.safe_dump(doc, sort_keys=False))
    if cfg is None or "<<" in doc:  # a merge key can bring in any of the keys below
        return
    # What parsed is what the document said.
    assert cfg.fail_on == doc.get("fail_on", "warning" if doc.get("extends") == "strict" else "error")
    assert len(cfg.audits) == len(doc.get("audits") or [])
    assert len(cfg.outputs) == len(doc.get("outputs") or [])


def _mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a valid value, sometimes any scalar: many documents parse, and each field is still probed."""
    return st.sampled_from(range(10)).flatmap(lambda i: SCALARS if i == 0 else good)


AUDIT = st.fixed_dictionaries(
    {"model": _mostly(st.sampled_from(["m.py:build", "random:3x32x32", "pkg.mod:make"]))},
    optional={"name": _mostly(st.text("abcdef", min_size=2, max_size=4)), "batch_size": _mostly(st.integers(-1, 64)),
              "steps": _mostly(st.integers(-1, 8)), "input_shape": _mostly(st.lists(st.integers(0, 4), max_size=3)),
              "trust_pickle": _mostly(st.booleans())},
)
OUTPUT = st.fixed_dictionaries({"format": _mostly(st.sampled_from(sorted(FORMATS))), "path": _mostly(st.just("o.txt"))},
                               optional={"overwrite": _mostly(st.booleans())})


@FUZZ
@given(st.fixed_dictionaries({}, optional={
    "extends": _mostly(st.sampled_from(["default", "strict"])), "fail_on": _mostly(st.sampled_from(FAIL_ON_CHOICES)),
    "audits": st.lists(AUDIT, max_size=4), "outputs": st.lists(OUTPUT, max_size=3),
}))
def test_fuzz_audits_and_outputs(doc):
    # Nearly valid audits and outputs, so the per-field checks decide, and many documents parse.
    cfg = _check_never_crashes(yaml.safe_dump(doc, sort_keys=False))
    if cfg is None:
        return
    assert cfg.fail_on == doc.get("fail_on", "warning" if doc.get("extends") == "strict" else "error")
    assert len(cfg.audits) == len(doc.get("audits") or [])
    assert len(cfg.outputs) == len(doc.get("outputs") or [])


ROOT = Path(__file__).resolve().parent.parent


def test_shipped_example_config_and_hooks_are_valid():
    cfg = load_config(ROOT / "examples" / "bnaudit.yaml")
    assert [a.name for a in cfg.audits] == ["cnn", "seed-mlp-bn", "keras-mlp-bn"]
    assert cfg.rules["BN106"].severity == "error" and cfg.rules["BN106"].options == {"max_momentum": 0.5}
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hooks[0]["id"] == "bnaudit-check" and hooks[0]["entry"] == "bnaudit check"
    assert hooks[0]["pass_filenames"] is False
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    steps = workflow["jobs"]["normalization"]["steps"]
    assert any(step.get("run", "").startswith("bnaudit check") for step in steps)
