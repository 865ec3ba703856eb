"""Validating bnaudit.yaml: the merged document (``compose``) checked against the schema key by key, every
mistake reported as ``FILE:LINE: key.path: problem`` with a did-you-mean for misspelt keys. Rule sections are
checked against the rule registry, and rule options through ``Rule.resolve_options`` so their types are
exactly the ones the rules declare. ``parse_config``/``load_config``/``find_config`` are the entry points."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit.errors import BnauditError, ConfigError
from bnaudit.findings import FAIL_ON_CHOICES, SEVERITIES
from bnaudit.gate.compose import Merged, load_chain, read_config_text
from bnaudit.gate.schema import (
    AUDIT_KEYS,
    CONFIG_NAMES,
    OUTPUT_FORMATS,
    OUTPUT_KEYS,
    RULE_KEYS,
    RULES_RESERVED,
    SPEC_KEYS,
    TOP_KEYS,
    AuditSpec,
    Config,
    KeyPath,
    OutputSpec,
    RuleSettings,
    describe,
    did_you_mean,
    key_path,
)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Validator:
    def __init__(self, merged: Merged, path: Path | None):
        self.m = merged
        self.path = path

    def where(self, path: KeyPath) -> str:
        file, line = self.m.origin.get(path, (str(self.path or "<config>"), 1))
        return f"{file}:{line}: {key_path(path)}"

    def fail(self, path: KeyPath, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {problem}")

    def keys(self, mapping: dict, path: KeyPath, allowed: Sequence[str]) -> None:
        for key in mapping:
            if key not in allowed:
                hint = did_you_mean(key, allowed)
                known = hint or f" (known: {', '.join(allowed)})"
                raise self.fail((*path, key), f"unknown key{known}")

    def mapping(self, value: Any, path: KeyPath, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping of {what}, got {describe(value)}")
        return value

    def string(self, value: Any, path: KeyPath, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {describe(value)}")
        return value.strip()

    def string_list(self, value: Any, path: KeyPath, what: str, item: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]  # `ignore: BN102` is read as a one-item list: it cannot mean anything else
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list of {what}, got {describe(value)}")
        out = []
        for i, entry in enumerate(value):
            if not isinstance(entry, str) or not entry.strip():
                raise self.fail((*path, i), f"must be {item}, got {describe(entry)}")
            out.append(entry.strip())
        return tuple(out)

    def positive_int(self, value: Any, path: KeyPath) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(path, f"must be a positive integer, got {describe(value)}")
        return value

    def boolean(self, value: Any, path: KeyPath) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {describe(value)}")
        return value

    def choice(self, value: Any, path: KeyPath, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            raise self.fail(path, f"must be one of {', '.join(choices)}, got {describe(value)}{hint}")
        return value

    def rule_patterns(self, patterns: tuple[str, ...], path: KeyPath) -> tuple[str, ...]:
        from bnaudit.rules.base import all_rules, matches

        rules = all_rules()
        names = [*(r.code for r in rules), *(r.name for r in rules)]
        for i, pattern in enumerate(patterns):
            if not any(matches(r.code, r.name, [pattern]) for r in rules):
                sub = (*path, i) if (*path, i) in self.m.origin else path
                raise self.fail(sub, f"{pattern!r} matches no rule{did_you_mean(pattern, names)}; `bnaudit rules` "
                                     "lists them")
        return patterns

    # ------------------------------------------------------------------ sections
    def run(self) -> Config:
        data = self.m.data
        self.keys(data, (), TOP_KEYS)
        fail_on = "error"
        if "fail_on" in data:
            fail_on = self.choice(data["fail_on"], ("fail_on",), FAIL_ON_CHOICES)
        select: tuple[str, ...] = ()
        ignore: tuple[str, ...] = ()
        rules: dict[str, RuleSettings] = {}
        if data.get("rules") is not None:
            select, ignore, rules = self.rules(self.mapping(data["rules"], ("rules",), "rule settings"))
        audits = self.audits(data.get("audits"))
        outputs = self.outputs(data.get("outputs"))
        baseline = None
        if data.get("baseline") is not None:
            baseline = self.m.base[("baseline",)] / self.string(data["baseline"], ("baseline",))
        sources = (*([self.path] if self.path is not None else []), *self.m.files)
        return Config(self.path, fail_on, select, ignore, rules, audits, outputs, baseline, tuple(self.m.chain),
                      sources)

    def rules(self, section: dict) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, RuleSettings]]:
        from bnaudit.rules.base import all_rules, matches

        registry = all_rules()
        names = [*RULES_RESERVED, *(r.code for r in registry), *(r.name for r in registry)]
        select = ignore = ()
        if section.get("select") is not None:
            select = self.rule_patterns(self.string_list(section["select"], ("rules", "select"), "rule codes", "a rule code"),
                                        ("rules", "select"))
        if section.get("ignore") is not None:
            ignore = self.rule_patterns(self.string_list(section["ignore"], ("rules", "ignore"), "rule codes", "a rule code"),
                                        ("rules", "ignore"))
        settings: dict[str, RuleSettings] = {}
        for key, value in section.items():
            if key in RULES_RESERVED:
                continue
            path = ("rules", key)
            if not isinstance(key, str):
                raise self.fail(path, "unknown key: rule keys are codes (BN203), prefixes (BN2) or names")
            matched = [r for r in registry if matches(r.code, r.name, [key])]
            if not matched:
                raise self.fail(path, f"unknown key: no rule or family {key!r}{did_you_mean(key, names)}; `bnaudit rules` "
                                      "lists them")
            settings[key] = self.rule_settings(value, path, matched)
        return select, ignore, settings

    def rule_settings(self, value: Any, path: KeyPath, matched: list) -> RuleSettings:
        if isinstance(value, bool):  # `BN203: false` (or `off`) switches a rule off; `true` forces it on
            return RuleSettings(enabled=value)
        if isinstance(value, str):  # `BN203: error` is shorthand for `{severity: error}`
            return RuleSettings(severity=self.choice(value, path, SEVERITIES))
        entry = self.mapping(value, path, "severity/options/ignore/enabled (or a severity, or true/false)")
        self.keys(entry, path, RULE_KEYS)
        severity = None
        if entry.get("severity") is not None:
            severity = self.choice(entry["severity"], (*path, "severity"), SEVERITIES)
        options: dict[str, Any] = {}
        if entry.get("options") is not None:
            raw = self.mapping(entry["options"], (*path, "options"), "option names to values")
            for rule in matched:
                for key, val in raw.items():
                    try:
                        rule.resolve_options({key: val})
                    except ConfigError as exc:
                        raise self.fail((*path, "options", key), str(exc)) from None
            options = dict(raw)
            # Store what the rule would use (ints widened to floats where a float is declared).
            if len(matched) == 1:
                resolved = matched[0].resolve_options(raw)
                options = {k: resolved[k] for k in raw}
        ignore: tuple[str, ...] = ()
        if entry.get("ignore") is not None:
            ignore = self.string_list(entry["ignore"], (*path, "ignore"), "layer globs", "a layer glob")
        enabled = None
        if entry.get("enabled") is not None:
            enabled = self.boolean(entry["enabled"], (*path, "enabled"))
        return RuleSettings(severity, options, ignore, enabled)

    def audits(self, value: Any) -> tuple[AuditSpec, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(("audits",), "must be a list of audits (start each with '- model: ...'), got "
                                         f"{describe(value)}")
        out: list[AuditSpec] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(value):
            path = ("audits", i)
            if isinstance(raw, str):  # `- examples/mlp.py:build_model` is shorthand for `- model: ...`
                raw = {"model": raw}
            entry = self.mapping(raw, path, "audit settings (model:, data:, ...)")
            self.keys(entry, path, AUDIT_KEYS)
            if entry.get("model") is None:
                raise self.fail(path, "missing key 'model' (a spec such as model.py:build_model)")
            base = self.m.base.get(path, Path("."))
            model = _rebase(self.string(entry["model"], (*path, "model")), base)
            name = self.string(entry.get("name", entry["model"]), (*path, "name"))
            if name in seen:
                raise self.fail((*path, "name") if "name" in entry else path,
                                f"audit name {name!r} is used twice (first at audits[{seen[name]}]); give each audit its "
                                "own name")
            seen[name] = i
            kwargs: dict[str, Any] = {}
            for key in ("data", "predict", "weights", "input_key"):
                if entry.get(key) is not None:
                    text = self.string(entry[key], (*path, key))
                    kwargs[key] = text if key == "input_key" else _rebase(text, base)
            for key in ("batch_size", "steps"):
                if entry.get(key) is not None:
                    kwargs[key] = self.positive_int(entry[key], (*path, key))
            if entry.get("device") is not None:
                kwargs["device"] = self.string(entry["device"], (*path, "device"))
            if entry.get("trust_pickle") is not None:
                kwargs["trust_pickle"] = self.boolean(entry["trust_pickle"], (*path, "trust_pickle"))
            if entry.get("input_shape") is not None:
                kwargs["input_shape"] = self.shape(entry["input_shape"], (*path, "input_shape"))
            line = self.m.origin.get(path, ("", 0))[1]
            locations = [("", self.where(path))]
            locations += [(key, self.where((*path, key))) for key in SPEC_KEYS
                          if key in entry and (*path, key) in self.m.origin]
            out.append(AuditSpec(name=name, model=model, line=line, locations=tuple(locations), **kwargs))
        return tuple(out)

    def shape(self, value: Any, path: KeyPath) -> tuple[int, ...]:
        if isinstance(value, str):  # "3x32x32", the CLI's spelling
            parts = value.lower().replace(",", "x").split("x")
            if all(p.strip().isdigit() and int(p) > 0 for p in parts):
                return tuple(int(p) for p in parts)
        elif isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            return tuple(value)
        raise self.fail(path, f"must be a shape like [3, 32, 32] or \"3x32x32\", got {describe(value)}")

    def outputs(self, value: Any) -> tuple[OutputSpec, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(("outputs",), f"must be a list of {{format, path}} entries, got {describe(value)}")
        out = []
        for i, raw in enumerate(value):
            path = ("outputs", i)
            entry = self.mapping(raw, path, "format and path")
            self.keys(entry, path, OUTPUT_KEYS)
            for key in ("format", "path"):
                if key not in entry:
                    raise self.fail(path, f"missing key {key!r}")
            fmt = self.choice(entry["format"], (*path, "format"), OUTPUT_FORMATS)
            target = self.m.base.get(path, Path(".")) / self.string(entry["path"], (*path, "path"))
            overwrite = True
            if entry.get("overwrite") is not None:
                overwrite = self.boolean(entry["overwrite"], (*path, "overwrite"))
            out.append(OutputSpec(fmt, target, overwrite))
        return tuple(out)


def _rebase(spec: str, base: Path) -> str:
    """Make a spec's file part relative to the config's folder instead of the working directory.

    Only specs whose file part exists under ``base`` are rewritten; anything else (``random:3x32x32``,
    ``package.module:name``, a missing file) is left for the loader to resolve or report."""
    if base == Path("."):
        return spec
    head, sep, tail = spec.rpartition(":")
    target, suffix = (head, f":{tail}") if sep and head and _IDENT.match(tail) else (spec, "")
    candidate = Path(target).expanduser()
    if candidate.is_absolute() or not (base / candidate).exists():
        return spec
    return f"{(base / candidate).as_posix()}{suffix}"


# --------------------------------------------------------------------------------------------- public
def parse_config(text: str, *, file: str = "bnaudit.yaml", base: Path | None = None) -> Config:
    """Validate config text.

    Args:
        text: the YAML text.
        file: the name used in messages (``FILE:LINE: key: problem``).
        base: the folder relative paths are resolved against (default: the folder of ``file``).

    Returns:
        The validated Config, presets merged in.

    Raises:
        ConfigError: anything wrong with the text, naming file, line and key.
    """
    base = Path(file).parent if base is None else base
    try:
        merged = load_chain(text, file, base, (file,))
        return _Validator(merged, Path(file)).run()
    except BnauditError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None
    except RecursionError:
        raise ConfigError(f"{file}: the document is nested too deeply") from None


def load_config(path: Path | str) -> Config:
    """Read and validate a bnaudit.yaml file.

    Args:
        path: the config file.

    Returns:
        The validated Config.

    Raises:
        ConfigError: the file is missing, unreadable, or invalid (the message names file:line and key).
    """
    p = Path(path)
    return parse_config(read_config_text(p), file=str(p), base=p.parent)


def find_config(start: Path | str = ".") -> Path | None:
    """The config file in ``start`` (``bnaudit.yaml``, ``bnaudit.yml`` or ``.bnaudit.yaml``), or None."""
    for name in CONFIG_NAMES:
        candidate = Path(start) / name
        if candidate.is_file():
            return candidate if str(start) != "." else Path(name)
    return None



__all__ = ["find_config", "load_config", "parse_config"]
