"""Safe file output: every file bnaudit writes goes through here, written to a temporary file beside the
target and renamed into place, so an interrupted run never leaves a half-written report or model, and an
existing file is only replaced with ``force``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from bnaudit.errors import OutputError


def check_writable(path: Path | str, *, force: bool) -> Path:
    """Return ``path`` as a Path if it may be written.

    Raises:
        OutputError: it exists and ``force`` is false, it is a folder, or its parent folder is missing.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p} is a folder; give a file path")
    if p.exists() and not force:
        raise OutputError(f"{p} already exists; pass --force to overwrite it")
    if not p.parent.exists():
        raise OutputError(f"folder {p.parent} does not exist; create it first")
    return p


def atomic_write(path: Path | str, write: Callable[[Path], None], *, force: bool) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    Raises:
        OutputError: as ``check_writable``.
    """
    p = check_writable(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would have (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if p.exists() and not force:  # re-check: another process may have created it meanwhile
            raise OutputError(f"{p} already exists; pass --force to overwrite it")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def atomic_write_text(path: Path | str, text: str, *, force: bool) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)
