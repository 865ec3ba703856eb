"""``bnaudit.watching.run_program`` on tiny scripts written for each case: the exit status Python gives, the
script's own traceback, and the interpreter state restored afterwards."""

from __future__ import annotations

import sys
import traceback

import pytest

from bnaudit.errors import UsageError
from bnaudit.watching import finish, run_program


def _script(tmp_path, text: str):
    path = tmp_path / "prog.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("body", "code", "message"), [
    ("pass", 0, None),
    ("import sys; sys.exit()", 0, None),
    ("import sys; sys.exit(3)", 3, None),
    ("import sys; sys.exit(258)", 2, None),
    ("import sys; sys.exit('bye')", 1, "bye"),
    ("raise ValueError('boom')", 1, None),
    ("raise KeyboardInterrupt", 130, None),
])
def test_exit_status_is_what_python_gives(tmp_path, body, code, message):
    got = run_program(_script(tmp_path, body + "\n"))
    assert got.code == code and got.message == message


def test_the_traceback_starts_in_the_script_and_state_is_restored(tmp_path, capsys):
    path = _script(tmp_path, "def f():\n    raise ValueError('boom')\n\nf()\n")
    argv, path0, main = list(sys.argv), sys.path[0], sys.modules["__main__"]
    got = run_program(path, ["a"])
    assert (sys.argv, sys.path[0], sys.modules["__main__"]) == (argv, path0, main)
    frames = traceback.extract_tb(got.tb)
    assert [(f.filename, f.lineno) for f in frames] == [(path, 4), (path, 2)]
    assert finish(got) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.rstrip().endswith("ValueError: boom")


def test_a_syntax_error_is_reported_as_python_does(tmp_path, capsys):
    got = run_program(_script(tmp_path, "x = (\n"))
    assert got.code == 1 and isinstance(got.exc, SyntaxError)
    finish(got)
    assert "SyntaxError" in capsys.readouterr().err


def test_missing_script_and_module_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="can't open file"):
        run_program(str(tmp_path / "missing.py"))
    with pytest.raises(UsageError, match="no module named"):
        run_program("no_such_module_for_bnaudit", module=True)
