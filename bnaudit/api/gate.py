"""``bnaudit.check``: the YAML CI gate from Python, as ``bnaudit check`` runs it. The config may be a file, a
dict with the same keys as bnaudit.yaml, or a validated Config; command-line style overrides go on top."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnaudit.gate import CheckResult, Config

__all__ = ["check", "gate_config"]


def gate_config(
    config: Path | str | Mapping[str, Any] | Config | None = None,
    *,
    fail_on: str | None = None,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    audits: Sequence[str] | None = None,
    baseline: Path | str | None = None,
    base: Path | str | None = None,
) -> Config:
    """The validated config a gate run uses, overrides applied (defaults < file < overrides).

    Args:
        config: a config file, a dict (the YAML's content), a Config, or None for ``./bnaudit.yaml``.
        fail_on, select, ignore, audits, baseline: as ``bnaudit check``'s flags.
        base: the folder a dict's relative paths are resolved against (default: the current folder).

    Raises:
        UsageError: no config file found, or an invalid ``fail_on``. ConfigError: an invalid config.
    """
    from bnaudit.errors import UsageError
    from bnaudit.findings import FAIL_ON_CHOICES
    from bnaudit.gate import Config, find_config, load_config, parse_config

    if fail_on is not None and fail_on not in FAIL_ON_CHOICES:
        raise UsageError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON_CHOICES)}")
    if config is None:
        config = find_config(".")
        if config is None:
            raise UsageError("no bnaudit.yaml in this folder; run `bnaudit init` to write one, or pass --config FILE")
    if isinstance(config, Mapping):
        import yaml

        folder = Path(base) if base is not None else Path.cwd()
        cfg = parse_config(yaml.safe_dump(dict(config), sort_keys=False), file="<dict>", base=folder)
    elif isinstance(config, Config):
        cfg = config
    else:
        cfg = load_config(config)
    return cfg.override(fail_on=fail_on, select=list(select or []), ignore=list(ignore or []), baseline=baseline,
                        audits=list(audits or []))


def check(
    config: Path | str | Mapping[str, Any] | Config | None = None, *, use_baseline: bool = True, **overrides: Any
) -> CheckResult:
    """Run the audits of a bnaudit.yaml (or dict) and judge the findings, as ``bnaudit check`` does.

    Args:
        config: a config file, a dict with bnaudit.yaml's keys, a Config, or None for ``./bnaudit.yaml``.
        use_baseline: False judges every finding (ignores any baseline).
        **overrides: as ``gate_config``: ``fail_on`` (replaces the config's), ``select`` (replaces
            ``rules.select``), ``ignore`` (added to ``rules.ignore``), ``audits`` (run only these),
            ``baseline`` (a baseline file to use), ``base`` (the folder a dict's relative paths start from).

    Returns:
        The CheckResult: ``.reports`` (what ``--format`` renders), ``.failed`` and ``.exit_code`` the verdict,
        ``.summary()`` the one-line verdict.

    Raises:
        UsageError, ConfigError: a bad config or override. SpecError, WeightsError, DataError: an audit's input
            is unusable (the message names the audit and the config line).
    """
    return run_checks(gate_config(config, **overrides), use_baseline=use_baseline)


def run_checks(config: Any, *, baseline: Any = None, use_baseline: bool = True) -> CheckResult:
    """``bnaudit.gate.run_checks`` with ``bnaudit.inspect`` as the audit: run every audit of a validated
    Config (``bnaudit.gate.load_config``) and judge the findings."""
    from bnaudit import gate
    from bnaudit.api.inspection import inspect

    return gate.run_checks(config, baseline=baseline, use_baseline=use_baseline, inspect=inspect)
