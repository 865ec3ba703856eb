"""The one guarded entry for the user's code.

bnaudit imports model files, calls factories and data builders, and runs predict functions and forward
passes inside its own process. That code was written to be a script: it may parse ``sys.argv``, call
``sys.exit``, ``print`` to stdout, or raise anything. Everything that protects bnaudit from it lives here:

- ``call(fn, ...)`` runs one piece of user code bnaudit calls on purpose (importing a file, a factory, a data
  builder): ``sys.argv`` is ``[the file]`` while it runs, so an argparse at import reads no bnaudit option;
  ``SystemExit`` and any exception become a :class:`UserCodeError` naming the spec, the file and the line;
  a ``BnauditError`` raised by the user's code (it called bnaudit) and ``KeyboardInterrupt`` pass through.
- ``session()`` is what the CLI runs a command in: the user's prints go to stderr (stdout carries the
  report, e.g. ``--format json``), and a ``SystemExit`` raised by user code anywhere else (a forward pass, a
  Dataset's ``__getitem__``, a worker) becomes a :class:`UserCodeError` too, found by the traceback's
  innermost frame in user code. Exit status and message then come from the CLI's one error boundary.

Nothing here imports torch."""

from __future__ import annotations

import contextlib
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

from bnaudit.errors import BnauditError, UserCodeError

#: Python files bnaudit imports by path are registered in sys.modules under this prefix.
USER_MODULE_PREFIX = "bnaudit_user_"
T = TypeVar("T")

_EXIT_HINT = (
    "bnaudit runs your code inside its own process, so an exit there would end the audit: put script code "
    'under `if __name__ == "__main__":`'
)


def describe(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (just the type name when the message is empty)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {str(Path(__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            roots.add(str(Path(paths[key]).resolve()))
    return tuple(sorted(roots))


def user_frame(tb: TracebackType | None) -> str | None:
    """``file:line`` of the innermost traceback frame in the user's code, or None when there is none.

    User code is a file bnaudit imported by path (``USER_MODULE_PREFIX``) or any Python file outside bnaudit,
    the standard library and installed packages (a ``package.module:NAME`` spec in the user's project).
    """
    roots = _library_roots()
    found = None
    while tb is not None:
        frame = tb.tb_frame
        filename = frame.f_code.co_filename
        name = str(frame.f_globals.get("__name__", ""))
        if name.startswith(USER_MODULE_PREFIX):
            found = f"{filename}:{tb.tb_lineno}"
        elif not filename.startswith("<"):
            resolved = str(Path(filename).resolve())
            if not resolved.startswith(roots):
                found = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _exit_text(exc: SystemExit) -> str:
    return f"sys.exit({exc.code!r})"


def call(fn: Callable[..., T], *args: Any, spec: str, action: str, argv0: str | Path | None = None) -> T:
    """Run one piece of the user's code that bnaudit calls on purpose.

    Args:
        fn: what to call (``fn(*args)``).
        spec: the spec the code came from, which every message starts with.
        action: what bnaudit was doing, for messages (``importing model.py``, ``building the model``).
        argv0: ``sys.argv[0]`` while it runs (default: ``spec``); nothing else is in ``sys.argv``.

    Returns:
        What ``fn`` returned.

    Raises:
        UserCodeError: the code called ``sys.exit`` or raised an exception (not a BnauditError).
        BnauditError, KeyboardInterrupt: raised by the code, passed through unchanged.
    """
    saved = sys.argv
    sys.argv = [str(argv0 if argv0 is not None else spec)]
    try:
        return fn(*args)
    except BnauditError:
        raise
    except SystemExit as exc:
        where = user_frame(exc.__traceback__)
        at = f" at {where}" if where else ""
        raise UserCodeError(f"{spec}: {action} called {_exit_text(exc)}{at}; {_EXIT_HINT}") from exc
    except Exception as exc:
        where = user_frame(exc.__traceback__)
        at = f" at {where}" if where else ""
        raise UserCodeError(f"{spec}: {action} raised {describe(exc)}{at}; fix it or rerun with --debug") from exc
    finally:
        sys.argv = saved


def iterate(items: Iterable[T], *, spec: str, action: str = "reading the data") -> Iterator[T]:
    """Yield from an iterable the user's code produces (a DataLoader over their Dataset, their generator),
    with the errors ``call`` gives: a ``SystemExit`` or exception while the next item is made becomes a
    :class:`UserCodeError` naming the spec, the batch and the file and line.

    Raises:
        UserCodeError: the user's code exited or raised while making an item.
    """
    it = iter(items)
    index = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except BnauditError:
            raise
        except (SystemExit, Exception) as exc:
            where = user_frame(exc.__traceback__)
            at = f" at {where}" if where else ""
            what = _exit_text(exc) if isinstance(exc, SystemExit) else describe(exc)
            verb = "called" if isinstance(exc, SystemExit) else "raised"
            raise UserCodeError(f"{spec}: {action} (batch {index + 1}) {verb} {what}{at}; fix the data code or "
                                "rerun with --debug") from exc
        yield item  # outside the try: an error thrown in by the consumer is not the data's
        index += 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C inside a CLI command so that the same clean-up runs (worker pools are
    terminated, temporary files removed, nothing half-written) before bnaudit exits with status 143."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def child_signals() -> None:
    """In a worker process bnaudit forks: SIGTERM ends it quietly (the parent terminates its workers that
    way) and Ctrl-C is left to the parent, so neither prints a traceback per worker."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def session() -> Iterator[TextIO]:
    """Run a CLI command's library work with the user's code kept in its place.

    Yields:
        The real stdout, for the report; ``sys.stdout`` itself points at stderr until the block ends, so
        whatever the user's code prints cannot corrupt a report on stdout. SIGTERM raises
        :class:`Terminated` meanwhile (main thread only).

    Raises:
        UserCodeError: a ``SystemExit`` escaped from the user's code (the innermost user frame is named).
    """
    out = sys.stdout
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _terminate)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield out
    except SystemExit as exc:
        where = user_frame(exc.__traceback__)
        if where is None:
            raise
        raise UserCodeError(f"{where}: your code called {_exit_text(exc)} while bnaudit ran it; {_EXIT_HINT}") from exc
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


__all__ = ["USER_MODULE_PREFIX", "Terminated", "call", "child_signals", "describe", "iterate", "session", "user_frame"]
