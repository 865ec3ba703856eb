"""Running the user's program in this process exactly as ``python SCRIPT.py ARGS`` or ``python -m MODULE ARGS``
would, so that ``bnaudit watch`` can look at it while it trains.

What ``python`` does and this module repeats: ``sys.argv`` is the script path as given (for ``-m``, the module's
file) followed by the script's arguments; ``sys.path[0]`` is the script's directory with symbolic links
resolved (for ``-m``, the current directory); the code runs as a fresh module named ``__main__`` that is
``sys.modules["__main__"]`` while it runs, so ``if __name__ == "__main__":`` and pickling of classes defined in
the script behave the same. The outcome is the exit status Python would give: 0 on success, ``sys.exit(code)``
as Python maps it, 1 after an uncaught exception, 130 on Ctrl-C (143 on SIGTERM inside the CLI).

The outcome is returned, not acted on: the caller writes its report first and then ``finish`` prints the
script's own traceback (through ``sys.excepthook``, without bnaudit's frames, as Python prints it) and the
``sys.exit`` message, so the user sees what they would have seen without bnaudit. ``sys.argv``, ``sys.path[0]``
and ``sys.modules["__main__"]`` are restored afterwards. Nothing here imports torch."""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bnaudit.errors import UsageError

__all__ = ["Outcome", "finish", "run_program"]

_SKIP_FILES = {os.path.normcase(os.path.abspath(f)) for f in (__file__, runpy.__file__)}


@dataclass
class Outcome:
    """How the user's program ended.

    Attributes:
        code: the exit status ``python`` would give.
        exc: the exception that ended it (SystemExit, KeyboardInterrupt or an error), or None.
        tb: the exception's traceback with bnaudit's own frames removed.
        message: what Python prints for ``sys.exit("text")`` (the text), else None.
    """

    code: int
    exc: BaseException | None = None
    tb: TracebackType | None = None
    message: str | None = None

    @property
    def interrupted(self) -> bool:
        return isinstance(self.exc, KeyboardInterrupt)

    @property
    def failed(self) -> bool:
        """An uncaught exception (not ``sys.exit``, not Ctrl-C) ended the program."""
        return self.exc is not None and not isinstance(self.exc, (SystemExit, KeyboardInterrupt))


def _exit_status(exc: SystemExit) -> tuple[int, str | None]:
    """``sys.exit(code)`` as Python's interpreter maps it: None -> 0, an int -> itself (modulo 256), anything
    else is printed to stderr and gives 1."""
    code = exc.code
    if code is None:
        return 0, None
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF, None
    if isinstance(code, bool):
        return int(code), None
    return 1, str(code)


def _user_tb(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame outside this module and runpy: the user's own frames."""
    while tb is not None and os.path.normcase(os.path.abspath(tb.tb_frame.f_code.co_filename)) in _SKIP_FILES:
        tb = tb.tb_next
    return tb


def _script_code(path: str) -> types.CodeType:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"can't open file {path!r}: no such file")
    if p.is_dir():
        raise UsageError(f"{path} is a folder; give the training script (a .py file), or use -m for a package")
    return compile(p.read_bytes(), path, "exec", dont_inherit=True)


def _run_script(path: str, args: list[str]) -> None:
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None, __package__=None, __spec__=None,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    code = _script_code(path)
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    sys.modules["__main__"] = main
    exec(code, main.__dict__)  # noqa: S102 - running the user's own program is what `bnaudit watch` is for


def _run_module(name: str, args: list[str]) -> None:
    sys.path[0] = os.getcwd()
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"no module named {name!r} ({exc})") from exc
    if spec is None:
        raise UsageError(f"no module named {name!r} (looked in the current folder and on sys.path)")
    sys.argv = [spec.origin or name, *args]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def run_program(target: str, args: list[str] | tuple[str, ...] = (), *, module: bool = False) -> Outcome:
    """Run a script (or with ``module=True`` a module, as ``python -m``) to its end.

    Args:
        target: the script's path, or the module's dotted name.
        args: the program's own arguments (``sys.argv[1:]``).
        module: run ``target`` as ``python -m target``.

    Returns:
        The Outcome: exit status and the exception that ended the program, if any.

    Raises:
        UsageError: the script does not exist or the module cannot be found (nothing of it ran).
    """
    saved_argv, saved_path0 = sys.argv, (sys.path[0] if sys.path else None)
    saved_main = sys.modules.get("__main__")
    if not sys.path:
        sys.path.append("")
    try:
        if module:
            _run_module(target, list(args))
        else:
            _run_script(target, list(args))
        return Outcome(0)
    except UsageError:
        raise
    except SystemExit as exc:
        code, message = _exit_status(exc)
        return Outcome(code, exc, _user_tb(exc.__traceback__), message)
    except KeyboardInterrupt as exc:
        code = 143 if type(exc).__name__ == "Terminated" else 130
        return Outcome(code, exc, _user_tb(exc.__traceback__))
    except BaseException as exc:  # noqa: BLE001 - the user's program may raise anything; it is passed on
        return Outcome(1, exc, _user_tb(exc.__traceback__))
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0
        if saved_main is not None:
            sys.modules["__main__"] = saved_main


def finish(outcome: Outcome) -> int:
    """Print what Python prints at the program's end (its traceback through ``sys.excepthook``, the text of
    ``sys.exit("text")``) and return the exit status to end with."""
    exc = outcome.exc
    if outcome.message is not None:
        sys.stderr.write(outcome.message + "\n")
    elif exc is not None and not isinstance(exc, SystemExit):
        if type(exc).__name__ == "Terminated":
            return outcome.code
        sys.excepthook(type(exc), exc.with_traceback(outcome.tb), outcome.tb)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    return outcome.code
