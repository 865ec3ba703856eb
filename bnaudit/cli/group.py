"""The Typer group behind ``bnaudit``: command-line errors (a bad option value, an unknown option) become the
one ``bnaudit: error:`` line and exit status every other input error gets, instead of a boxed usage block."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

# Typer >= 0.20 vendors click (its errors derive from typer.TyperException, and click itself may not be
# installed at all); older Typer raises click's own.
try:
    import click
except ImportError:  # Typer without click
    click = None
_CLI_ERRORS = tuple({getattr(typer, "TyperException", None), getattr(click, "ClickException", None)} - {None})
_ABORTS = tuple({typer.Abort, getattr(click, "Abort", None)} - {None})


class Group(TyperGroup):
    """Typer's group with command-line errors (a bad option value, an unknown option) printed as the one
    ``bnaudit: error:`` line every other input error gets, instead of a boxed usage block."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLI_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `bnaudit` alone: the help text, as Typer shows it
                return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
            ctx = getattr(exc, "ctx", None)
            sub = ctx.command.name if ctx is not None and ctx.parent is not None else None
            exit_code = int(getattr(exc, "exit_code", 2))
            hint = f" (see `bnaudit{' ' + sub if sub else ''} --help`)" if exit_code == 2 else ""
            typer.echo(f"bnaudit: error: {exc.format_message()}{hint}", err=True)  # type: ignore[attr-defined]
            sys.exit(exit_code)
        except _ABORTS:
            typer.echo("bnaudit: error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)



__all__ = ["Group"]
