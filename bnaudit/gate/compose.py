"""Reading bnaudit.yaml: YAML composed with PyYAML's safe loader to a node tree first, so that every key and
every list item keeps the line it came from, and the ``extends:`` chain merged over the presets shipped in
``bnaudit/gate/presets/`` (``default``, ``strict``) or other YAML files. The extending file wins key by key
(``rules`` mappings merge; lists and scalars are replaced); every key path remembers the file and line it came
from, so that validation can report ``FILE:LINE: key.path: problem``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bnaudit.errors import ConfigError
from bnaudit.files import read_text_capped
from bnaudit.gate.schema import KeyPath, describe, did_you_mean, key_path

PRESETS_DIR = Path(__file__).parent / "presets"
# Guards against YAML bombs (nested aliases) and absurd nesting in fuzzed or hostile files.
_MAX_DEPTH = 50
_MAX_NODES = 100_000


@dataclass
class _Doc:
    """A parsed YAML document: plain Python values plus the line of every key and item."""

    file: str
    data: Any
    lines: dict[KeyPath, int]


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
        lines: dict[KeyPath, int] = {}
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
    loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, lines: dict, file: str, depth: int, budget: list[int]
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
                raise ConfigError(f"{file}:{line}: {key_path(path) or 'top level'}: a key must be a plain word")
            if key in out:
                raise ConfigError(f"{file}:{line}: {key_path((*path, key))}: duplicate key (first at line "
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
        raise ConfigError(f"{file}:{node.start_mark.line + 1}: {key_path(path) or 'top level'}: invalid value "
                          f"({exc})") from None


def read_config_text(path: Path) -> str:
    """The text of a config file (or a file it extends), capped in size.

    Raises:
        ConfigError: the file is missing, a folder, not UTF-8 or unreadable.
    """
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
class Merged:
    """Data merged over the extends chain, each key path remembering the file and line it came from."""

    data: dict[str, Any]
    origin: dict[KeyPath, tuple[str, int]]
    base: dict[KeyPath, Path]  # folder that relative paths under this key are relative to
    chain: list[str]
    files: list[Path] = field(default_factory=list)  # YAML files extended (not presets)


def _merge_into(dst: dict, src: dict, path: KeyPath) -> None:
    for key, value in src.items():
        # `rules` and per-rule mappings merge; everything else (lists, audits, outputs) is replaced whole.
        if isinstance(value, dict) and isinstance(dst.get(key), dict) and (path == () and key == "rules" or
                                                                             path == ("rules",)):
            _merge_into(dst[key], value, (*path, key))
        else:
            dst[key] = value


def _record_origin(merged: Merged, doc: _Doc, base: Path) -> None:
    # The extending file's lines win for every path it mentions. Entries left from a replaced subtree of a
    # parent are never looked up: validation only asks about paths present in the merged data, and every
    # such path under a replaced key is one this file wrote.
    for p, line in doc.lines.items():
        merged.origin[p] = (doc.file, line)
        merged.base[p] = base


def load_chain(text: str, file: str, base: Path, seen: tuple[str, ...]) -> Merged:
    """``text`` (read from ``file``) merged over everything it extends, outermost preset first.

    Args:
        text: the YAML text.
        file: its name in messages.
        base: the folder its relative paths are relative to.
        seen: the files already on the chain (an ``extends:`` cycle is an error).

    Raises:
        ConfigError: invalid YAML, a document that is not a mapping, a bad or cyclic ``extends:``.
    """
    doc = _compose(text, file)
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{file}:1: the config must be a mapping of keys (fail_on:, rules:, audits:...), "
                          f"got {describe(doc.data)}")
    merged = Merged({}, {}, {}, [])
    if "extends" in doc.data:
        parent = doc.data["extends"]
        line = doc.lines[("extends",)]
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{file}:{line}: extends: must be a preset name ({', '.join(preset_names())}) "
                              f"or a YAML file path, got {describe(parent)}")
        parent_file, parent_text, parent_base = _resolve_extends(parent, base, f"{file}:{line}")
        if parent_file in seen:
            raise ConfigError(f"{file}:{line}: extends: {parent!r} extends itself in a cycle; remove one link")
        merged = load_chain(parent_text, parent_file, parent_base, (*seen, parent_file))
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
        raise ConfigError(f"{where}: extends: no preset {name!r}{did_you_mean(name, preset_names())}; presets are "
                          f"{', '.join(preset_names())}, or give a .yaml file")
    path = base / Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"{where}: extends: file {path} not found")
    return str(path), read_config_text(path), path.parent



__all__ = ["PRESETS_DIR", "Merged", "load_chain", "preset_names", "read_config_text"]
