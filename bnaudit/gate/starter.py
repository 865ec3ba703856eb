"""The commented starter bnaudit.yaml that ``bnaudit init`` writes."""

from __future__ import annotations

from bnaudit.errors import ConfigError
from bnaudit.gate.compose import preset_names
from bnaudit.gate.schema import did_you_mean

STARTER = """\
# bnaudit.yaml: the normalization gate for CI. `bnaudit check` reads this file;
# `bnaudit rules` lists every rule code, `bnaudit rules BN101` documents one.
# Precedence: built-in defaults < preset (extends) < this file < command-line flags.

# `default` fails on errors; `strict` also fails on warnings.
extends: {preset}

# Lowest severity that makes `bnaudit check` exit 1: error, warning, info or never.
# fail_on: error

rules:
  # Run only these rules (codes, families like BN2, or names); leave out to run all.
  # select: [BN1, BN2, BN3]
  # Never run these.
  # ignore: [BN102]
  # Per-rule settings: severity, options (see `bnaudit rules CODE`), layers to ignore (globs).
  # BN203:
  #   severity: error
  #   ignore: ["classifier.*"]

# One entry per model to audit. Paths are relative to this file.
audits:
  - name: my-model
    model: model.py:build_model      # a factory returning an nn.Module (or a .pt file)
    # data: model.py:build_data      # real batches enable the dynamic rules
    # predict: model.py:predict      # how your code runs inference, if not model(x)
    # weights: checkpoint.pt
    batch_size: 32
    steps: 8

# Report files written after every run (formats: json, sarif, junit, github, markdown).
# outputs:
#   - {{format: sarif, path: bnaudit.sarif}}
#   - {{format: junit, path: bnaudit-junit.xml}}

# Findings accepted on purpose; write it with `bnaudit check --write-baseline FILE`.
# baseline: bnaudit-baseline.json
"""


def starter_config(preset: str = "default") -> str:
    """The commented bnaudit.yaml that ``bnaudit init`` writes.

    Raises:
        ConfigError: ``preset`` is not a shipped preset.
    """
    if preset not in preset_names():
        raise ConfigError(f"no preset {preset!r}{did_you_mean(preset, preset_names())}; presets are "
                          f"{', '.join(preset_names())}")
    return STARTER.format(preset=preset)



__all__ = ["STARTER", "starter_config"]
