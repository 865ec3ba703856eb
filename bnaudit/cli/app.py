"""The Typer application and what every command shares: the --debug switch, the error boundary that turns a
BnauditError (or a command-line usage error) into one line on stderr and exit status 2, the user-code session
(``bnaudit.usercode.session``: the user's prints go to stderr, stdout keeps the report), and the output plan.

Command modules (``bnaudit/cli/<command>.py``) register themselves on ``app`` with ``@command()``; each is
a docstring, option parsing and one call into the library. torch is never imported here."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, TextIO, TypeVar

import typer
from typer.core import TyperGroup

from bnaudit import __version__
from bnaudit.errors import BnauditError, OutputError

# Typer >= 0.20 vendors click (its errors derive from typer.TyperException, and click itself may not be
# installed at all); older Typer raises click's own.
try:
    import click
except ImportError:  # Typer without click
    click = None
_CLI_ERRORS = tuple({getattr(typer, "TyperException", None), getattr(click, "ClickException", None)} - {None})
_ABORTS = tuple({typer.Abort, getattr(click, "Abort", None)} - {None})


class _Group(TyperGroup):
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


app = typer.Typer(
    cls=_Group,
    name="bnaudit",
    help="Audit a PyTorch model's normalization: lint the wiring, probe it on real batches, and measure "
    "whether BatchNorm helps.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False, "stdout": None}
F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("BNAUDIT_DEBUG") == "1"


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``bnaudit: error: message`` on stderr and return the Exit to raise."""
    typer.echo(f"bnaudit: error: {message}", err=True)
    return typer.Exit(code)


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` plus the error boundary: the command runs in a ``usercode.session`` (the user's prints
    go to stderr, a ``sys.exit`` in the user's code is an error naming the file), and a BnauditError (or a
    KeyboardInterrupt) becomes one line and exit 2 (130); with --debug the traceback is shown instead."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            from bnaudit import usercode

            try:
                with usercode.session() as out:
                    _state["stdout"] = out
                    return fn(*a, **kw)
            except BnauditError as exc:
                if _state["debug"]:
                    raise
                raise fail(str(exc), exc.exit_code) from None
            except KeyboardInterrupt as exc:
                if isinstance(exc, usercode.Terminated):
                    raise fail("terminated", 143) from None
                raise fail("interrupted", 130) from None
            finally:
                _state["stdout"] = None

        app.command(*args, **kwargs)(wrapper)
        return fn

    return decorate


def debug_enabled() -> bool:
    return bool(_state["debug"])


def stdout() -> TextIO:
    """Where the report goes: the real stdout (inside a command ``sys.stdout`` is the user's, sent to stderr)."""
    return _state["stdout"] or sys.stdout


def print_stdout(text: str) -> None:
    out = stdout()
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


def stdout_console(**kwargs: Any) -> Any:
    """A rich Console on the report's stdout."""
    from rich.console import Console

    return Console(file=stdout(), **kwargs)


def plan_outputs(inputs: Iterable[Any] = ()) -> Any:
    """A ``bnaudit.files.OutputPlan`` that protects ``inputs`` (spec strings or paths the run reads)."""
    from bnaudit.files import OutputPlan, spec_paths

    return OutputPlan(inputs=spec_paths(*inputs))


__all__ = [
    "OutputError",
    "app",
    "command",
    "debug_enabled",
    "fail",
    "plan_outputs",
    "print_stdout",
    "stdout",
    "stdout_console",
]
