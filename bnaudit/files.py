"""Safe file input and output: every file bnaudit writes goes through here, and so do the small text files it
reads (configs, baselines).

Output is planned. A command declares every output up front in an :class:`OutputPlan`, which checks them all
before any work is done: no output replaces an input of the same run (the model, data, config, a preset, the
baseline being read) or any file inside the bnaudit package; a ``.py`` file is never written; an existing
file is replaced only when allowed (``--force``, or a config entry's ``overwrite:``, where an explicit
``overwrite: false`` is never overridden); only regular files are replaced; the folder must be writable (it is
tried, since ``os.access`` says yes to root on a read-only file system); folder outputs (``--plot DIR``) are
created with their parents. At the end ``commit`` writes every output to a temporary file beside its target
and renames them into place together: an interrupted run (Ctrl-C, SIGTERM, an error) leaves all outputs
written or none, and a file that was replaced is restored if a later rename fails.

``atomic_write`` is the single-file form for library callers. ``read_text_capped`` reads a text file only if
it is a regular file no larger than a limit (a config that links to ``/dev/urandom`` is refused, not read
forever)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bnaudit.errors import LimitError, OutputError

#: Largest config or baseline file bnaudit reads (1 MiB: a hand-written YAML file is a few KiB).
MAX_TEXT_BYTES = 1 << 20
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".py", ".pyw", ".pyi")
_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

Content = str | bytes | Callable[[Path], None]


# --------------------------------------------------------------------------------------------- reading
def read_text_capped(path: Path | str, *, limit: int = MAX_TEXT_BYTES, what: str = "file") -> str:
    """Read a UTF-8 text file that must be a regular file of at most ``limit`` bytes.

    Raises:
        FileNotFoundError, IsADirectoryError: as ``open`` would.
        OSError: a pipe, socket or device (``strerror`` says so), or the file cannot be read.
        UnicodeDecodeError: not UTF-8.
        LimitError: the file is larger than ``limit``.
    """
    p = Path(path)
    st = os.stat(p)  # follows a symlink: what counts is what would be read
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(p))
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a pipe, socket or device)", str(p))
    with open(p, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise LimitError(
            f"{p} is larger than {_size(limit)}, more than any {what} bnaudit reads; check that it is the right file"
        )
    return data.decode("utf-8")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def spec_paths(*specs: object) -> list[Path]:
    """The files named by MODEL/DATA/PREDICT/weights specs or paths (``model.py:build_model`` -> model.py;
    ``random:3x32x32``, objects and None name no file)."""
    out = []
    for spec in specs:
        if isinstance(spec, Path):
            out.append(spec)
        elif isinstance(spec, str) and spec and not spec.startswith("random:"):
            head, sep, tail = spec.rpartition(":")
            out.append(Path(head if sep and head and _ATTR.match(tail) else spec).expanduser())
    return out


# --------------------------------------------------------------------------------------------- planning
@dataclass
class _Output:
    path: Path
    label: str
    replace: bool
    why_not: str  # the refusal's advice when the path exists and may not be replaced
    names: tuple[str, ...] | None = None  # a folder output: the file names it may receive


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def _same(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _probe(folder: Path, label: str, target: Path) -> None:
    """Create and remove a file in ``folder``: the only reliable test that it can be written."""
    try:
        fd, name = tempfile.mkstemp(prefix=".bnaudit-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"{label} {target}: cannot write in folder {folder} ({exc.strerror or exc}); choose a folder you can "
            "write to"
        ) from None
    os.close(fd)
    os.unlink(name)


class OutputPlan:
    """Every file one command writes, checked before the work and written together after it.

    Typical use::

        plan = OutputPlan(inputs=spec_paths(model, data))
        plan.file(out, label="--output", replace=force)
        plan.check()                      # before the slow work: every refusal happens here
        ...
        plan.commit({out: text})          # all outputs, atomically as a set
    """

    def __init__(self, inputs: Iterable[Path | str] = ()) -> None:
        self._inputs: list[Path] = [Path(p) for p in inputs]
        self._outputs: list[_Output] = []

    def protect(self, *paths: Path | str | None) -> None:
        """Add files this run reads; no output may replace them."""
        self._inputs.extend(Path(p) for p in paths if p is not None)

    def file(self, path: Path | str | None, *, label: str, replace: bool = False, why_not: str = "") -> None:
        """Declare an output file (None: nothing to declare).

        Args:
            path: where it goes.
            label: how the user named it (``--output``, ``outputs[1] (sarif)``), for messages.
            replace: whether an existing file may be replaced (``--force``, or the config's ``overwrite:``).
            why_not: the advice when it exists and may not be replaced (default: pass --force).
        """
        if path is not None:
            self._outputs.append(_Output(Path(path), label, replace, why_not or "pass --force to overwrite it"))

    def folder(self, path: Path | str | None, names: Iterable[str], *, label: str, replace: bool = False) -> None:
        """Declare an output folder (created with its parents) that receives files among ``names``."""
        if path is not None:
            self._outputs.append(_Output(Path(path), label, replace, "pass --force to overwrite it", tuple(names)))

    def _targets(self) -> Iterator[tuple[_Output, Path]]:
        for out in self._outputs:
            if out.names is None:
                yield out, out.path
            else:
                for name in out.names:
                    yield out, out.path / name

    def check(self) -> None:
        """Check every declared output; nothing is written.

        Raises:
            OutputError: an output is an input of this run, a ``.py`` file, a file inside bnaudit, declared
                twice, exists and may not be replaced, is a folder or a special file, or its folder is missing
                or cannot be written.
        """
        seen: dict[Path, str] = {}
        for out in self._outputs:
            if out.names is not None:
                self._check_folder(out)
        for out, target in self._targets():
            label = out.label
            if target.suffix.lower() in _SOURCE_SUFFIXES:
                raise OutputError(f"{label} {target}: bnaudit never writes a Python source file; give another name "
                                  "(reports: .json, .sarif, .xml, .md, .html; models: .pt)")
            key = _key(target)
            if key in seen:
                raise OutputError(f"{seen[key]} and {label} both write {target}; give each its own path")
            seen[key] = label
            for inp in self._inputs:
                if _same(target, inp):
                    raise OutputError(f"{label} {target} is also an input of this run ({inp}); bnaudit never "
                                      "overwrites its inputs: write the output somewhere else")
            if _PACKAGE_DIR in key.parents:
                raise OutputError(f"{label} {target} is inside bnaudit's own installation; write it somewhere else")
            if target.exists() or target.is_symlink():
                self._check_existing(out, target)
            if out.names is None:
                parent = target.parent
                if not parent.exists():
                    raise OutputError(f"folder {parent} does not exist; create it first")
                if not parent.is_dir():
                    raise OutputError(f"{label} {target}: {parent} is not a folder")
                _probe(parent, label, target)

    def _check_existing(self, out: _Output, target: Path) -> None:
        if target.is_dir():
            raise OutputError(f"{out.label} {target} is a folder; give a file path")
        if target.exists() and not stat.S_ISREG(os.stat(target).st_mode):
            raise OutputError(f"{out.label} {target} is not a regular file (a pipe, socket or device); bnaudit "
                              "only replaces files it could have written: give a file path")
        if not out.replace:
            raise OutputError(f"{target} already exists; {out.why_not}")

    def _check_folder(self, out: _Output) -> None:
        path = out.path
        if path.exists() and not path.is_dir():
            raise OutputError(f"{out.label} {path} is a file; give a folder")
        existing = path
        while not existing.exists():
            if existing.is_symlink():
                raise OutputError(f"{out.label} {path}: {existing} is a broken symbolic link")
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{out.label} {path}: {existing} is a file, not a folder")
        _probe(existing, out.label, path)

    def commit(self, contents: Mapping[Path | str, Content]) -> list[Path]:
        """Write ``contents`` (path -> text, bytes, or a function writing the file it is given) as one set.

        Every path must have been declared (a file, or a name inside a declared folder). Each output is
        written to a temporary file beside its target first; then all are renamed into place with SIGINT and
        SIGTERM held back, so an interruption leaves all outputs or none, and a failed rename restores what
        the earlier ones replaced.

        Returns:
            The paths written, in the order given.

        Raises:
            OutputError: an undeclared path, or a target that appeared meanwhile and may not be replaced.
        """
        allowed = {_key(t): out for out, t in self._targets()}
        staged: list[tuple[Path, Path, _Output]] = []
        made: list[Path] = []
        try:
            for raw, content in contents.items():
                target = Path(raw)
                out = allowed.get(_key(target))
                if out is None:
                    raise OutputError(f"{target} was not declared as an output of this command (a bug in bnaudit)")
                made.extend(_make_folders(target.parent) if out.names is not None else [])
                staged.append((target, _stage(target, content), out))
            with _signals_held():
                _rename_all(staged)
        except BaseException:
            for _, tmp, _ in staged:
                _unlink(tmp)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when still empty
            raise
        return [t for t, _, _ in staged]


def _make_folders(folder: Path) -> list[Path]:
    made = []
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            try:
                p.mkdir()
            except OSError as exc:
                raise OutputError(f"cannot create folder {p} ({exc.strerror or exc})") from None
            made.append(p)
    return made


def _stage(target: Path, content: Content) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {target} ({exc.strerror or exc}); choose a folder you can write to") from None
    os.close(fd)
    tmp = Path(name)
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the mode a plain open() would
    except OSError as exc:
        _unlink(tmp)
        raise OutputError(f"cannot write {target} ({exc.strerror or exc})") from None
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _rename_all(staged: list[tuple[Path, Path, _Output]]) -> None:
    done: list[tuple[Path, Path | None]] = []  # (target, backup of the file it replaced)
    try:
        for target, tmp, out in staged:
            if target.exists() or target.is_symlink():
                _refuse_existing(out, target)
            backup = None
            if target.exists():
                backup = _backup(target)
            os.replace(tmp, target)
            done.append((target, backup))
    except BaseException as exc:
        for target, backup in reversed(done):
            if backup is not None:
                os.replace(backup, target)
            else:
                _unlink(target)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {target} ({exc.strerror or exc}); nothing was written") from None
        raise
    for _, backup in done:
        if backup is not None:
            _unlink(backup)


def _refuse_existing(out: _Output, target: Path) -> None:
    # Re-checked at the rename: another process may have created the file since the plan was checked.
    if not out.replace:
        raise OutputError(f"{target} already exists; {out.why_not}")
    if target.is_dir() or (target.exists() and not stat.S_ISREG(os.stat(target).st_mode)):
        raise OutputError(f"{out.label} {target} is not a regular file; nothing was written")


def _backup(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bak", dir=target.parent)
    os.close(fd)
    os.unlink(name)
    try:
        os.link(target, name)  # a second name for the old file: the target itself is never missing
    except OSError:
        shutil.copy2(target, name)
    return Path(name)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


# --------------------------------------------------------------------------------------------- one file
def check_writable(path: Path | str, *, force: bool) -> Path:
    """Return ``path`` as a Path if it may be written (the single-file form of ``OutputPlan.check``).

    Raises:
        OutputError: it exists and ``force`` is false, it is a folder, a special file or a ``.py`` file, or
            its folder is missing or cannot be written.
    """
    plan = OutputPlan()
    plan.file(path, label="output", replace=force)
    plan.check()
    return Path(path)


def atomic_write(path: Path | str, write: Callable[[Path], None], *, force: bool) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    Raises:
        OutputError: as ``check_writable``.
    """
    plan = OutputPlan()
    plan.file(path, label="output", replace=force)
    plan.check()
    return plan.commit({Path(path): write})[0]


def atomic_write_text(path: Path | str, text: str, *, force: bool) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)


__all__ = [
    "MAX_TEXT_BYTES",
    "OutputPlan",
    "atomic_write",
    "atomic_write_text",
    "check_writable",
    "read_text_capped",
    "spec_paths",
]
