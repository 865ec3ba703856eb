"""The schema of bnaudit.yaml, the CI gate's configuration: its keys, the validated records a config becomes
(``Config``, ``RuleSettings``, ``AuditSpec``, ``OutputSpec``) and how a key path or a wrong value is spelled in
an error message. Reading the YAML is ``compose``'s job and checking it against this schema ``validate``'s;
precedence for the caller: built-in defaults < preset < file < command-line flags (``Config.override``)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bnaudit.errors import ConfigError
from bnaudit.findings import FAIL_ON_CHOICES
from bnaudit.report import FORMATS

CONFIG_NAMES = ("bnaudit.yaml", "bnaudit.yml", ".bnaudit.yaml")

TOP_KEYS = ("extends", "fail_on", "rules", "audits", "outputs", "baseline")
RULES_RESERVED = ("select", "ignore")
RULE_KEYS = ("severity", "options", "ignore", "enabled")
AUDIT_KEYS = (
    "name",
    "model",
    "data",
    "predict",
    "weights",
    "batch_size",
    "steps",
    "device",
    "input_shape",
    "input_key",
    "trust_pickle",
)
# Audit keys naming something to load: an error loading one is reported at that key's line.
SPEC_KEYS = ("model", "data", "predict", "weights")
OUTPUT_KEYS = ("format", "path", "overwrite")
# Formats an `outputs:` entry may name: every registered renderer (`auto` is for terminals, not files).
OUTPUT_FORMATS = tuple(FORMATS)

# A key's place in the document: ``("audits", 0, "model")``.
KeyPath = tuple[Any, ...]


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RuleSettings:
    """What the config says about one rule (or a family, when keyed by a prefix).

    Attributes:
        severity: severity every finding of the rule gets, or None to keep the rule's own.
        options: rule options, already type-checked and merged over the rule's defaults.
        ignore: layer globs (``features.*``) whose findings of this rule are dropped.
        enabled: True forces the rule on, False turns it off, None leaves it to ``select``/``ignore``.
    """

    severity: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    enabled: bool | None = None


@dataclass(frozen=True)
class AuditSpec:
    """One audit: a model, optionally its data and predict function, and how long to probe it.

    Spec strings that point at files are already rebased onto the config file's folder, so a config works
    from whatever directory ``bnaudit check`` is run in. ``locations`` say where in the config the entry and
    its spec keys are (``bnaudit.yaml:3: audits[0].model``), so that an input error found only when the audit
    runs (a model file that does not exist) still points at the line to fix.
    """

    name: str
    model: str
    data: str | None = None
    predict: str | None = None
    weights: str | None = None
    batch_size: int = 32
    steps: int = 8
    device: str = "cpu"
    input_shape: tuple[int, ...] | None = None
    input_key: str | None = None
    trust_pickle: bool = False
    line: int = 0
    locations: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def where(self, key: str | None = None) -> str | None:
        """``FILE:LINE: audits[i].key`` for a spec key (``model``, ``data``, ``predict``, ``weights``), or for
        the entry itself when ``key`` is None or was not written as a key; None for an audit built in code."""
        found = dict(self.locations)
        return found.get(key or "") or found.get("")


@dataclass(frozen=True)
class OutputSpec:
    """A report file to write after the audits: a format name and a path (relative to the config)."""

    format: str
    path: Path
    overwrite: bool = True


@dataclass(frozen=True)
class Config:
    """A validated bnaudit.yaml, presets merged in.

    Attributes:
        path: the file it was read from (None for a config built in code).
        fail_on: the lowest severity that fails the gate (``error``, ``warning``, ``info``, ``never``).
        select: rule codes, prefixes or names to run (empty: every rule).
        ignore: rule codes, prefixes or names not to run.
        rules: per-rule settings keyed by the code, prefix or name used in the file.
        audits: the audits to run, in file order.
        outputs: report files to write.
        baseline: a baseline file of accepted findings, or None.
        extends: the chain of presets/files merged under this one, outermost first.
        sources: every file read to build it: this file and the YAML files it extends (never an output).
    """

    path: Path | None = None
    fail_on: str = "error"
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    rules: Mapping[str, RuleSettings] = field(default_factory=dict)
    audits: tuple[AuditSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    baseline: Path | None = None
    extends: tuple[str, ...] = ()
    sources: tuple[Path, ...] = ()

    def override(
        self,
        *,
        fail_on: str | None = None,
        select: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        baseline: Path | str | None = None,
        audits: Sequence[str] | None = None,
    ) -> Config:
        """A copy with command-line values on top (the last step of defaults < file < flags).

        Args:
            fail_on: replaces the file's ``fail_on``.
            select: replaces the file's ``rules.select`` when non-empty.
            ignore: added to the file's ``rules.ignore``.
            baseline: replaces the file's ``baseline``.
            audits: keep only the audits with these names.

        Raises:
            ConfigError: ``fail_on`` is not a severity or ``never``; an audit name not in the file.
            UsageError: a ``select``/``ignore`` pattern that matches no rule.
        """
        new = self
        if select or ignore:
            from bnaudit.rules.base import validate_patterns

            # Checked here, before any audit runs, so a typo fails in a second rather than after the first model.
            validate_patterns(select or [], "--select")
            validate_patterns(ignore or [], "--ignore")
        if fail_on is not None:
            if fail_on not in FAIL_ON_CHOICES:
                raise ConfigError(f"--fail-on {fail_on!r} is not one of {', '.join(FAIL_ON_CHOICES)}")
            new = replace(new, fail_on=fail_on)
        if select:
            new = replace(new, select=tuple(select))
        if ignore:
            new = replace(new, ignore=(*new.ignore, *ignore))
        if baseline is not None:
            new = replace(new, baseline=Path(baseline))
        if audits:
            names = [a.name for a in new.audits]
            for wanted in audits:
                if wanted not in names:
                    raise ConfigError(f"--audit {wanted!r} is not an audit in {new.path}{did_you_mean(wanted, names)}")
            new = replace(new, audits=tuple(a for a in new.audits if a.name in audits))
        return new

    def rule_config(self) -> dict[str, dict[str, Any]]:
        """Per-rule settings as ``bnaudit.inspect(rule_config=...)`` takes them, keyed by rule code.

        A prefix key (``BN2``) expands to every rule it matches; an exact code or name wins over a prefix.
        """
        from bnaudit.rules.base import all_rules, matches

        out: dict[str, dict[str, Any]] = {}
        # Broad keys first so that narrower ones (longer prefixes, exact codes) overwrite them.
        for key in sorted(self.rules, key=_specificity):
            settings = self.rules[key]
            for rule in all_rules():
                if matches(rule.code, rule.name, [key]):
                    entry = out.setdefault(rule.code, {"severity": None, "options": {}, "ignore": []})
                    if settings.severity:
                        entry["severity"] = settings.severity
                    entry["options"].update(settings.options)
                    entry["ignore"] = [*entry["ignore"], *(g for g in settings.ignore if g not in entry["ignore"])]
        return out

    def selection(self) -> tuple[list[str], list[str]]:
        """``(select, ignore)`` patterns for the rule registry, with ``enabled:`` switches applied.

        ``enabled: true`` wins over any ignore pattern that covers the rule: a prefix or glob that does
        (``ignore: [BN3]`` with ``BN307: {enabled: true}``) is replaced by the codes it covers, less the
        rules switched on."""
        from bnaudit.rules.base import all_rules, matches

        select = list(self.select)
        ignore = list(self.ignore)
        for key, settings in self.rules.items():
            if settings.enabled is False:
                ignore.append(key)
            elif settings.enabled is True:
                if select and key not in select:
                    select.append(key)
                on = {r.code for r in all_rules() if matches(r.code, r.name, [key])}
                kept: list[str] = []
                for p in ignore:
                    covered = [r.code for r in all_rules() if matches(r.code, r.name, [p])]
                    if not on.intersection(covered):
                        kept.append(p)
                    else:
                        kept += [c for c in covered if c not in on and c not in kept]
                ignore = kept
        return select, ignore


def _specificity(key: str) -> tuple[int, int, str]:
    exact = bool(re.fullmatch(r"BN\d{3}", key.upper())) or "-" in key
    return (1 if exact else 0, len(key), key)

def key_path(path: KeyPath) -> str:
    """``rules.BN203.options`` / ``audits[0].model``: the key path as a user would write it."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def did_you_mean(word: Any, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""



def describe(value: Any) -> str:
    """How a wrong value is shown: short values verbatim, others by YAML type."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40):
        return repr(value)
    if isinstance(value, str):
        return "a long string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


__all__ = [
    "AUDIT_KEYS",
    "CONFIG_NAMES",
    "OUTPUT_FORMATS",
    "OUTPUT_KEYS",
    "RULES_RESERVED",
    "RULE_KEYS",
    "SPEC_KEYS",
    "TOP_KEYS",
    "AuditSpec",
    "Config",
    "KeyPath",
    "OutputSpec",
    "RuleSettings",
    "describe",
    "did_you_mean",
    "key_path",
]
