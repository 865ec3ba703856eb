"""bnaudit.yaml: the schema of the CI gate's configuration, the presets it can extend, and its validation.

The file is read with PyYAML's safe loader only, composed to a node tree first so that every key and every
list item keeps the line it came from: a mistake is reported as ``FILE:LINE: key.path: problem`` with a
did-you-mean for misspelt keys. ``extends:`` pulls in a preset shipped in ``bnaudit/presets/`` (``default``,
``strict``) or another YAML file; the extending file wins key by key (mappings merge, lists and scalars are
replaced). Rule sections are checked against the rule registry, and rule options through
``Rule.resolve_options`` so their types are exactly the ones the rules declare. Precedence for the caller:
built-in defaults < preset < file < command-line flags (``Config.override``)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bnaudit.errors import BnauditError, ConfigError
from bnaudit.files import read_text_capped
from bnaudit.findings import FAIL_ON_CHOICES, SEVERITIES
from bnaudit.report import FORMATS

CONFIG_NAMES = ("bnaudit.yaml", "bnaudit.yml", ".bnaudit.yaml")
PRESETS_DIR = Path(__file__).parent / "presets"

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
# Guards against YAML bombs (nested aliases) and absurd nesting in fuzzed or hostile files.
_MAX_DEPTH = 50
_MAX_NODES = 100_000
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

Path_ = tuple[Any, ...]


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
            from bnaudit.rules.catalog import validate_patterns

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
                    raise ConfigError(f"--audit {wanted!r} is not an audit in {new.path}{_hint(wanted, names)}")
            new = replace(new, audits=tuple(a for a in new.audits if a.name in audits))
        return new

    def rule_config(self) -> dict[str, dict[str, Any]]:
        """Per-rule settings as ``bnaudit.inspect(rule_config=...)`` takes them, keyed by rule code.

        A prefix key (``BN2``) expands to every rule it matches; an exact code or name wins over a prefix.
        """
        from bnaudit.rules.catalog import all_rules, matches

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
        from bnaudit.rules.catalog import all_rules, matches

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


# --------------------------------------------------------------------------------------------- YAML
@dataclass
class _Doc:
    """A parsed YAML document: plain Python values plus the line of every key and item."""

    file: str
    data: Any
    lines: dict[Path_, int]


def _compose(text: str, file: str) -> _Doc:
    """Parse ``text`` with the safe loader, keeping line numbers.

    Raises:
        ConfigError: YAML syntax errors (with their line), several documents, duplicate keys, values the
            safe loader refuses, or a document nested too deeply.
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # raised while the reader checks the text for control characters
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(f"{file}:{line}: invalid YAML: character {exc.character!r} is not allowed in YAML "
                          "text") from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.composer.ComposerError as exc:
            if "expected a single document" in str(exc):
                raise ConfigError(f"{file}:{_mark_line(exc)}: several YAML documents in one file; keep one") from None
            raise
        lines: dict[Path_, int] = {}
        budget = [_MAX_NODES]
        data = _build(loader, node, (), lines, file, 0, budget) if node is not None else None
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{file}:{_mark_line(exc)}: invalid YAML: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # The safe constructors raise plain ValueErrors for e.g. an impossible timestamp (2020-13-45).
        raise ConfigError(f"{file}: invalid YAML value: {exc}") from None
    finally:
        loader.dispose()
    return _Doc(file, data, lines)


def _mark_line(exc: BaseException) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else 1


def _build(
    loader: yaml.SafeLoader, node: yaml.Node, path: Path_, lines: dict, file: str, depth: int, budget: list[int]
) -> Any:
    budget[0] -= 1
    if depth > _MAX_DEPTH or budget[0] < 0:
        raise ConfigError(f"{file}:{node.start_mark.line + 1}: the document is nested too deeply or too large")
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<) the way safe_load does
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"{file}:{line}: {_where(path) or 'top level'}: a key must be a plain word")
            if key in out:
                raise ConfigError(f"{file}:{line}: {_where((*path, key))}: duplicate key (first at line "
                                  f"{lines[(*path, key)]})")
            lines[(*path, key)] = line
            out[key] = _build(loader, value_node, (*path, key), lines, file, depth + 1, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(loader, item, (*path, i), lines, file, depth + 1, budget) for i, item in enumerate(node.value)
        ]
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, OverflowError) as exc:
        # The safe constructors raise plain errors for e.g. an impossible timestamp (2020-13-45).
        raise ConfigError(f"{file}:{node.start_mark.line + 1}: {_where(path) or 'top level'}: invalid value "
                          f"({exc})") from None


def _where(path: Path_) -> str:
    """``rules.BN203.options`` / ``audits[0].model``: the key path as a user would write it."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _hint(word: Any, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read(path: Path) -> str:
    try:
        return read_text_capped(path, what="config file")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; run `bnaudit init` to write one") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give the path of a bnaudit.yaml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None


# --------------------------------------------------------------------------------------------- merging
@dataclass
class _Merged:
    """Data merged over the extends chain, each key path remembering the file and line it came from."""

    data: dict[str, Any]
    origin: dict[Path_, tuple[str, int]]
    base: dict[Path_, Path]  # folder that relative paths under this key are relative to
    chain: list[str]
    files: list[Path] = field(default_factory=list)  # YAML files extended (not presets)


def _merge_into(dst: dict, src: dict, path: Path_) -> None:
    for key, value in src.items():
        # `rules` and per-rule mappings merge; everything else (lists, audits, outputs) is replaced whole.
        if isinstance(value, dict) and isinstance(dst.get(key), dict) and (path == () and key == "rules" or
                                                                             path == ("rules",)):
            _merge_into(dst[key], value, (*path, key))
        else:
            dst[key] = value


def _record_origin(merged: _Merged, doc: _Doc, base: Path) -> None:
    # The extending file's lines win for every path it mentions. Entries left from a replaced subtree of a
    # parent are never looked up: validation only asks about paths present in the merged data, and every
    # such path under a replaced key is one this file wrote.
    for p, line in doc.lines.items():
        merged.origin[p] = (doc.file, line)
        merged.base[p] = base


def _load_chain(text: str, file: str, base: Path, seen: tuple[str, ...]) -> _Merged:
    doc = _compose(text, file)
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{file}:1: the config must be a mapping of keys (fail_on:, rules:, audits:...), "
                          f"got {_type(doc.data)}")
    merged = _Merged({}, {}, {}, [])
    if "extends" in doc.data:
        parent = doc.data["extends"]
        line = doc.lines[("extends",)]
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{file}:{line}: extends: must be a preset name ({', '.join(preset_names())}) "
                              f"or a YAML file path, got {_type(parent)}")
        parent_file, parent_text, parent_base = _resolve_extends(parent, base, f"{file}:{line}")
        if parent_file in seen:
            raise ConfigError(f"{file}:{line}: extends: {parent!r} extends itself in a cycle; remove one link")
        merged = _load_chain(parent_text, parent_file, parent_base, (*seen, parent_file))
        merged.chain.append(parent)
        if parent not in preset_names():
            merged.files.append(Path(parent_file))
    _merge_into(merged.data, {k: v for k, v in doc.data.items() if k != "extends"}, ())
    _record_origin(merged, doc, base)
    return merged


def preset_names() -> list[str]:
    """Names ``extends:`` accepts besides file paths."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _resolve_extends(name: str, base: Path, where: str) -> tuple[str, str, Path]:
    if name in preset_names():
        path = PRESETS_DIR / f"{name}.yaml"
        return f"preset {name}", path.read_text(encoding="utf-8"), base
    if not name.endswith((".yaml", ".yml")):
        raise ConfigError(f"{where}: extends: no preset {name!r}{_hint(name, preset_names())}; presets are "
                          f"{', '.join(preset_names())}, or give a .yaml file")
    path = base / Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"{where}: extends: file {path} not found")
    return str(path), _read(path), path.parent


# --------------------------------------------------------------------------------------------- validation
class _Validator:
    def __init__(self, merged: _Merged, path: Path | None):
        self.m = merged
        self.path = path

    def where(self, path: Path_) -> str:
        file, line = self.m.origin.get(path, (str(self.path or "<config>"), 1))
        return f"{file}:{line}: {_where(path)}"

    def fail(self, path: Path_, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {problem}")

    def keys(self, mapping: dict, path: Path_, allowed: Sequence[str]) -> None:
        for key in mapping:
            if key not in allowed:
                known = f" (known: {', '.join(allowed)})" if not _hint(key, allowed) else _hint(key, allowed)
                raise self.fail((*path, key), f"unknown key{known}")

    def mapping(self, value: Any, path: Path_, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping of {what}, got {_type(value)}")
        return value

    def string(self, value: Any, path: Path_, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {_type(value)}")
        return value.strip()

    def string_list(self, value: Any, path: Path_, what: str, item: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]  # `ignore: BN102` is read as a one-item list: it cannot mean anything else
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list of {what}, got {_type(value)}")
        out = []
        for i, entry in enumerate(value):
            if not isinstance(entry, str) or not entry.strip():
                raise self.fail((*path, i), f"must be {item}, got {_type(entry)}")
            out.append(entry.strip())
        return tuple(out)

    def positive_int(self, value: Any, path: Path_) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(path, f"must be a positive integer, got {_type(value)}")
        return value

    def boolean(self, value: Any, path: Path_) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_type(value)}")
        return value

    def choice(self, value: Any, path: Path_, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            hint = _hint(value, choices) if isinstance(value, str) else ""
            raise self.fail(path, f"must be one of {', '.join(choices)}, got {_type(value)}{hint}")
        return value

    def rule_patterns(self, patterns: tuple[str, ...], path: Path_) -> tuple[str, ...]:
        from bnaudit.rules.catalog import all_rules, matches

        rules = all_rules()
        names = [*(r.code for r in rules), *(r.name for r in rules)]
        for i, pattern in enumerate(patterns):
            if not any(matches(r.code, r.name, [pattern]) for r in rules):
                sub = (*path, i) if (*path, i) in self.m.origin else path
                raise self.fail(sub, f"{pattern!r} matches no rule{_hint(pattern, names)}; `bnaudit rules` lists them")
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
        from bnaudit.rules.catalog import all_rules, matches

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
                raise self.fail(path, f"unknown key: no rule or family {key!r}{_hint(key, names)}; `bnaudit rules` "
                                      "lists them")
            settings[key] = self.rule_settings(value, path, matched)
        return select, ignore, settings

    def rule_settings(self, value: Any, path: Path_, matched: list) -> RuleSettings:
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
            raise self.fail(("audits",), f"must be a list of audits (start each with '- model: ...'), got {_type(value)}")
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

    def shape(self, value: Any, path: Path_) -> tuple[int, ...]:
        if isinstance(value, str):  # "3x32x32", the CLI's spelling
            parts = value.lower().replace(",", "x").split("x")
            if all(p.strip().isdigit() and int(p) > 0 for p in parts):
                return tuple(int(p) for p in parts)
        elif isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            return tuple(value)
        raise self.fail(path, f"must be a shape like [3, 32, 32] or \"3x32x32\", got {_type(value)}")

    def outputs(self, value: Any) -> tuple[OutputSpec, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(("outputs",), f"must be a list of {{format, path}} entries, got {_type(value)}")
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


def _type(value: Any) -> str:
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
        merged = _load_chain(text, file, base, (file,))
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
    return parse_config(_read(p), file=str(p), base=p.parent)


def find_config(start: Path | str = ".") -> Path | None:
    """The config file in ``start`` (``bnaudit.yaml``, ``bnaudit.yml`` or ``.bnaudit.yaml``), or None."""
    for name in CONFIG_NAMES:
        candidate = Path(start) / name
        if candidate.is_file():
            return candidate if str(start) != "." else Path(name)
    return None


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
        raise ConfigError(f"no preset {preset!r}{_hint(preset, preset_names())}; presets are "
                          f"{', '.join(preset_names())}")
    return STARTER.format(preset=preset)


__all__ = [
    "CONFIG_NAMES",
    "AuditSpec",
    "Config",
    "OutputSpec",
    "RuleSettings",
    "find_config",
    "load_config",
    "parse_config",
    "preset_names",
    "starter_config",
]
