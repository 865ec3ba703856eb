"""Generate docs/rules.md, the rule reference, from the rule registry.

Every registered rule contributes a row to the index table and one section: its code, name, default
severity, family, summary, documentation (its docstring, the same text ``bnaudit rules CODE`` prints), fix,
option defaults, what it needs to run, and the notes of the cases it is tested on. The page is never edited by
hand; tests/test_docs.py fails when it differs from what this script generates.

    python tools/gen_rules_doc.py            # (re)write docs/rules.md
    python tools/gen_rules_doc.py --check    # exit 1 with one line when docs/rules.md is stale

The index table has a column saying whether a rule's finding can be fixed automatically by ``bnaudit fix``
(``safe``, ``unsafe``, ``checkpoint``, ``none``), read from ``bnaudit.fixing.fix_kind``; each section says it
too. ``render`` and ``index_table`` take that ``{code: availability}`` mapping as ``fix_modes``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "rules.md"

# Families in the order the codes run; a family not listed here is appended under its own name.
FAMILY_TITLES = {
    "architecture": "Architecture (BN1xx): how normalization is wired",
    "data": "Data and batches (BN2xx): what the layers see",
    "modes": "Eval mode and running statistics (BN3xx)",
    "distributed": "Distributed training (BN4xx)",
}
FIX_MODES = ("safe", "unsafe", "checkpoint", "none")
# Requirements every rule has; saying so in each section would only be noise.
UNSTATED_REQUIREMENTS = {"graph"}


def registry() -> tuple[list[Any], Mapping[str, str]]:
    """The registered rules (ordered by code) and the requirement -> "needs ..." texts.

    Looked up in ``bnaudit.rules`` first and in ``bnaudit.rules.base`` second, so the generator keeps
    working when the registry moves between the two."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import bnaudit.rules as package

    try:
        from bnaudit.rules import base
    except ImportError:  # the registry lives in the package itself
        base = package
    all_rules = getattr(package, "all_rules", None) or base.all_rules
    requirements = getattr(package, "REQUIREMENTS", None) or getattr(base, "REQUIREMENTS", {})
    return list(all_rules()), requirements


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def index_table(rules: Sequence[Any], fix_modes: Mapping[str, str] | None = None) -> list[str]:
    """The index: one row per rule, linking to its section; a ``fix`` column when ``fix_modes`` is given.

    Raises:
        ValueError: ``fix_modes`` misses a rule or names an availability outside FIX_MODES.
    """
    columns = ["code", "name", "severity", "family", "summary"]
    if fix_modes is not None:
        missing = sorted(r.code for r in rules if r.code not in fix_modes)
        unknown = sorted({m for m in fix_modes.values() if m not in FIX_MODES})
        if missing or unknown:
            raise ValueError(f"fix_modes: missing rules {missing}, unknown availabilities {unknown}")
        columns.append("fix")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rules:
        row = [f"[{r.code}](#{r.code.lower()})", f"`{r.name}`", r.severity, r.family, cell(r.summary)]
        if fix_modes is not None:
            row.append(fix_modes[r.code])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def doc_markdown(doc: str) -> list[str]:
    """A rule docstring as Markdown: runs of lines indented by four spaces become fenced code blocks
    (kept as they are when the run is itself a fenced block, such as the options' YAML); the rest is kept."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("    "):
            out.append(lines[i])
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].startswith("    "):
            block.append(lines[i][4:])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += block if block[0].startswith("```") else ["```", *block, "```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return out


def case_lines(title: str, examples: Iterable[Any]) -> list[str]:
    """One line per tested case, with its note when it has one."""
    examples = list(examples)
    if not examples:
        return []
    notes = [e.note for e in examples if e.note]
    head = f"- {len(examples)} case{'s' if len(examples) > 1 else ''} {title}"
    return [head + (":" if notes else "")] + [f"  - {note}" for note in notes]


FIX_WORDS = {
    "safe": "a safe fix (applied by `bnaudit fix`; the model's function is kept)",
    "unsafe": "an unsafe fix (applied by `bnaudit fix --unsafe-fixes`; it changes behaviour as the fix says)",
    "checkpoint": "a checkpoint fix (`bnaudit fix --weights W -o OUT` writes a repaired copy)",
    "none": "none: edit by hand",
}


def section(rule: Any, requirements: Mapping[str, str], fix_mode: str | None = None) -> list[str]:
    """One rule's section: heading, facts line, summary, documentation, fix, defaults, needs, cases."""
    lines = [f"### {rule.code}", ""]
    lines.append(f"`{rule.name}` · severity **{rule.severity}** · family {rule.family}")
    lines += ["", f"*{rule.summary}.*", "", *doc_markdown(rule.doc()), "", f"**Fix:** {rule.fix}"]
    if fix_mode is not None:
        lines += ["", f"**Automatic fix:** {FIX_WORDS[fix_mode]} ([fix.md](fix.md))."]
    if rule.defaults:
        defaults = ", ".join(f"`{key}={value!r}`" for key, value in rule.defaults.items())
        lines += ["", f"**Defaults:** {defaults}"]
    needs = [requirements.get(r, r) for r in sorted(rule.requires) if r not in UNSTATED_REQUIREMENTS]
    if needs:
        lines += ["", "**Runs when:** " + "; ".join(needs)]
    cases = case_lines("that must fire", rule.invalid) + case_lines("that must not fire", rule.valid)
    if cases:
        lines += ["", "**Tested on** (`tests/rules/test_examples.py` runs every case):", *cases]
    return lines + [""]


def render(rules: Sequence[Any], requirements: Mapping[str, str], fix_modes: Mapping[str, str] | None = None) -> str:
    """The whole page."""
    lines = [
        "# Rule reference",
        "",
        "<!-- Generated by tools/gen_rules_doc.py from the rule registry: do not edit by hand. -->",
        "",
        f"{len(rules)} rules. Each has a stable code, a default severity (change it per rule in `bnaudit.yaml`, see",
        "[check.md](check.md)), and the documentation below, which `bnaudit rules CODE` also prints.",
        "Select or ignore rules by code, prefix (`BN1`) or name: `bnaudit inspect MODEL --select BN1,BN301`.",
        "",
        *index_table(rules, fix_modes),
        "",
    ]
    families = list(FAMILY_TITLES) + sorted({r.family for r in rules} - set(FAMILY_TITLES))
    for family in families:
        members = [r for r in rules if r.family == family]
        if members:
            lines += [f"## {FAMILY_TITLES.get(family, family)}", ""]
            for rule in members:
                lines += section(rule, requirements, fix_modes.get(rule.code) if fix_modes else None)
    return "\n".join(lines).rstrip("\n") + "\n"


def generate() -> str:
    """docs/rules.md as the current registry makes it."""
    from bnaudit.fixing import fix_kind

    rules, requirements = registry()
    return render(rules, requirements, {r.code: fix_kind(r.code) or "none" for r in rules})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the registry")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: docs/rules.md")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is stale: run `python tools/gen_rules_doc.py`", file=sys.stderr)
            return 1
        return 0
    if args.output.is_file() and args.output.read_text(encoding="utf-8") == text:
        return 0
    from bnaudit.files import atomic_write_text

    atomic_write_text(args.output, text, force=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
