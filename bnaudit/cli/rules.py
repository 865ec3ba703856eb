"""``bnaudit rules``: the rule catalogue, or one rule's full documentation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from bnaudit.cli.app import command, print_stdout, stdout_console


@command("rules")
def rules_cmd(
    code: Annotated[Optional[str], typer.Argument(help="A rule code (BN101) or name (redundant-bias).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue as JSON.")] = False,
) -> None:
    """List the rules, or print one rule's documentation: what it checks, why, its options, and examples."""
    from bnaudit.fixing.catalog import fix_info, fix_kind
    from bnaudit.rules.catalog import all_rules, get_rule

    if code is not None:
        rule = get_rule(code)
        head = f"{rule.code} {rule.name} ({rule.severity}, {rule.family})"
        lines = [head, "=" * len(head), "", rule.summary + ".", "", rule.doc(), "", f"Fix: {rule.fix}",
                 "", _automatic_fix(fix_info(rule.code))]
        if rule.defaults:
            lines += ["", "Defaults: " + ", ".join(f"{k}={v!r}" for k, v in rule.defaults.items())]
        from bnaudit.rules.base import REQUIREMENTS

        needs = [REQUIREMENTS[r] for r in sorted(rule.requires) if r not in ("graph",)]
        if needs:
            lines += ["", "Runs when: " + "; ".join(needs)]
        print_stdout("\n".join(lines))
        return
    rules = all_rules()
    if as_json:
        import json

        print_stdout(json.dumps([
            {"code": r.code, "name": r.name, "severity": r.severity, "family": r.family, "summary": r.summary,
             "fix": r.fix, "fix_kind": fix_kind(r.code), "options": dict(r.defaults), "requires": sorted(r.requires)}
            for r in rules
        ], indent=2))
        return
    from rich.table import Table

    table = Table(header_style="bold", pad_edge=False)
    for col in ("code", "name", "severity", "fix", "summary"):
        table.add_column(col, overflow="fold")
    for r in rules:
        table.add_row(r.code, r.name, r.severity, fix_kind(r.code) or "", r.summary)
    stdout_console(highlight=False).print(table)
    print_stdout("`bnaudit rules CODE` prints a rule's documentation. fix: what `bnaudit fix` applies (safe: by "
                 "default; unsafe: with --unsafe-fixes; checkpoint: with --weights and -o).")


def _automatic_fix(info: object) -> str:
    """The rule documentation's line about ``bnaudit fix``."""
    if info is None:
        return "Automatic fix: none (`bnaudit fix` lists the finding with the line to edit by hand)."
    kind, action, why = info.kind, info.action, info.why_unsafe  # type: ignore[attr-defined]
    if kind == "safe":
        return f"Automatic fix: safe, applied by `bnaudit fix`: {action}."
    if kind == "unsafe":
        return f"Automatic fix: unsafe, applied by `bnaudit fix --unsafe-fixes`: {action}. Unsafe because {why}."
    return f"Automatic fix: checkpoint, applied by `bnaudit fix --weights W -o OUT`: {action}."
