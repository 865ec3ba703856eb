"""Shared helpers of the watch tests: where the scripts are, a marked line's number, running a script in
this process under ``bnaudit.watch()`` and running the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "scripts"


def marked_line(script: str, marker: str) -> int:
    """The 1-based number of the only line of ``tests/scripts/<script>`` containing ``marker``."""
    lines = [i for i, text in enumerate((SCRIPTS / script).read_text().splitlines(), 1) if marker in text]
    assert len(lines) == 1, (script, marker, lines)
    return lines[0]


def watch_script(script: str, *args: str, **options):
    """Run ``tests/scripts/<script>`` in this process under ``bnaudit.watch(**options)``."""
    import bnaudit
    from bnaudit.watching import run_program

    with bnaudit.watch(**options) as w:
        outcome = run_program(str(SCRIPTS / script), list(args))
    return w, outcome


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("BNAUDIT_DEBUG", None)
    return e


def run(argv: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def bnaudit_watch(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "bnaudit", "watch", *argv], cwd)
