"""The CI gate behind ``bnaudit check`` and its configuration, bnaudit.yaml.

``schema`` holds the keys and the validated records (``Config``, ``AuditSpec``, ...); ``compose`` reads YAML
keeping every key's line and merges the ``extends:`` chain over the shipped ``presets/``; ``validate`` checks
the merged document against the schema and the rule registry (``load_config``); ``gate`` runs the audits and
decides pass or fail (``run_checks``); ``baseline`` sets aside accepted findings; ``starter`` is the file
``bnaudit init`` writes. Nothing here imports torch or prints. (The package is not called ``check``: that name
is the API function ``bnaudit.check``.)"""

from __future__ import annotations

from bnaudit.gate.baseline import Baseline, finding_key, load_baseline, render_baseline
from bnaudit.gate.compose import preset_names
from bnaudit.gate.gate import CheckResult, apply_rule_config, run_checks
from bnaudit.gate.schema import CONFIG_NAMES, AuditSpec, Config, OutputSpec, RuleSettings
from bnaudit.gate.starter import starter_config
from bnaudit.gate.validate import find_config, load_config, parse_config

__all__ = [
    "CONFIG_NAMES",
    "AuditSpec",
    "Baseline",
    "CheckResult",
    "Config",
    "OutputSpec",
    "RuleSettings",
    "apply_rule_config",
    "find_config",
    "finding_key",
    "load_baseline",
    "load_config",
    "parse_config",
    "preset_names",
    "render_baseline",
    "run_checks",
    "starter_config",
]
