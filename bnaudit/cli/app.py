"""The Typer application and what every command shares: the --debug switch, the error boundary that turns a
BnauditError into one line on stderr and exit status 2, and safe output writing.

Command modules (``bnaudit/cli/<command>.py``) register themselves on ``app`` with ``@command()``; each is
a docstring, option parsing and one call into the library. torch is never imported here."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from bnaudit import __version__
from bnaudit.errors import BnauditError, OutputError

app = typer.Typer(
    name="bnaudit",
    help="Audit a PyTorch model's normalization: lint the wiring, probe it on real batches, and measure "
    "whether BatchNorm helps.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
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
    """``app.command`` plus the error boundary: a BnauditError (or a KeyboardInterrupt) becomes one line
    and exit 2; with --debug the traceback is shown instead."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except BnauditError as exc:
                if _state["debug"]:
                    raise
                raise fail(str(exc), exc.exit_code) from None
            except KeyboardInterrupt:
                raise fail("interrupted", 130) from None

        app.command(*args, **kwargs)(wrapper)
        return fn

    return decorate


def debug_enabled() -> bool:
    return bool(_state["debug"])


def write_text_output(path: Path, text: str, *, force: bool) -> None:
    """Write ``text`` to ``path`` atomically; refuse to overwrite without ``force``.

    Raises:
        OutputError: the file exists and ``force`` is false, or its folder does not exist.
    """
    from bnaudit.io import atomic_write_text

    atomic_write_text(path, text, force=force)


def print_stdout(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


__all__ = ["OutputError", "app", "command", "debug_enabled", "fail", "print_stdout", "write_text_output"]
