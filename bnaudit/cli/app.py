"""The Typer application and what every command shares: the --debug switch, the error boundary that turns a
BnauditError into one line on stderr and exit status 2 (``bnaudit.cli.group`` does the same for command-line
usage errors), the user-code session (``bnaudit.usercode.session``: the user's prints go to stderr, stdout
keeps the report), the output plan, and drawing a report's styled view on stdout.

Command modules (``bnaudit/cli/<command>.py``) register themselves on ``app`` with ``@command()``; each is
a docstring, option parsing and one call into the library. torch is never imported here."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TextIO, TypeVar

import typer

from bnaudit import __version__
from bnaudit.cli.group import Group
from bnaudit.errors import BnauditError, UsageError

app = typer.Typer(
    cls=Group,
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


def plan_model_output(output: Any, inputs: Iterable[Any], *, force: bool, missing: str) -> Any:
    """The checked plan for a command's one ``-o`` file, before the (slow) work; ``missing`` is the error
    when ``-o`` is not given."""
    if output is None:
        raise UsageError(missing)
    plan = plan_outputs(inputs)
    plan.file(output, label="--output", replace=force)
    plan.check()
    return plan


def print_view(items: Iterable[Any]) -> None:
    """Draw a ``bnaudit.report.transforms`` view on stdout: each (text, style) line as literal text (module
    reprs hold brackets that markup would swallow), each ``Rows`` as a borderless table."""
    from rich.table import Table
    from rich.text import Text

    console = stdout_console(highlight=False, soft_wrap=True)
    for item in items:
        if isinstance(item, tuple):
            console.print(Text(item[0], style=item[1]))
            continue
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        for name, justify in item.columns:
            table.add_column(name, justify=justify, overflow="fold")
        for row in item.rows:
            table.add_row(*(Text(c[0], style=c[1]) if isinstance(c, tuple) else c for c in row))
        console.print(table)


__all__ = ["app", "command", "fail", "plan_model_output", "plan_outputs", "print_stdout",
           "print_view", "stdout", "stdout_console"]
