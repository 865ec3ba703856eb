"""Resolving ``PATH.py:NAME``, ``PATH.py`` and ``package.module:NAME`` specs to Python objects.

A user's model file is imported once per process under a private module name (its folder is put on
sys.path while it runs, so it can import its neighbours), so MODEL, DATA and PREDICT specs pointing into the
same file share one namespace: ``build_data`` and ``predict`` are found beside ``build_model``. Imports run
through ``bnaudit.usercode.call``: ``sys.argv`` is ``[the file]`` while the file runs, and ``sys.exit`` or an
exception at import becomes one clear error naming the file."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from bnaudit import usercode
from bnaudit.errors import SpecError, UserCodeError
from bnaudit.usercode import USER_MODULE_PREFIX

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_loaded: dict[Path, types.ModuleType] = {}



def loaded_files() -> list[Path]:
    """The ``.py`` files imported so far as ``bnaudit_user_*`` modules, in import order (a spawned process
    imports them again before it unpickles anything defined in them)."""
    return list(_loaded)

@dataclass(frozen=True)
class PySpec:
    """A parsed Python spec: where the module is (a file or an importable name) and the attribute."""

    text: str
    path: Path | None
    module: str | None
    attr: str | None


def parse_py_spec(spec: str) -> PySpec | None:
    """Split ``spec`` into module and attribute; None when it is not a Python spec at all."""
    head, sep, tail = spec.rpartition(":")
    if sep and _IDENT.match(tail) and head:
        target, attr = head, tail
    else:
        target, attr = spec, None
    if target.endswith(".py"):
        return PySpec(spec, Path(target), None, attr)
    if attr is not None and _IDENT.match(target):
        return PySpec(spec, None, target, attr)
    return None


def import_file(path: Path, spec_text: str) -> types.ModuleType:
    """Import a .py file once per process and return it.

    Raises:
        SpecError: the file is missing or raises while it is imported.
    """
    path = path.expanduser()
    if not path.is_file():
        raise SpecError(f"{spec_text}: {missing_file(path)}")
    key = path.resolve()
    if key in _loaded:
        return _loaded[key]
    name = USER_MODULE_PREFIX + hashlib.sha1(str(key).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, key)
    if spec is None or spec.loader is None:
        raise SpecError(f"{spec_text}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    folder = str(key.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        usercode.call(spec.loader.exec_module, module, spec=spec_text, action=f"importing {path}", argv0=path)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    _loaded[key] = module
    return module


def forget_files(folder: Path) -> None:
    """Forget the files imported from ``folder`` (a temporary folder about to be deleted): later imports of
    the same path read it again, and ranks spawned for training do not try to import files that are gone."""
    root = folder.resolve()
    for key in [k for k in _loaded if root in k.parents]:
        module = _loaded.pop(key)
        sys.modules.pop(module.__name__, None)


def import_target(spec: PySpec) -> types.ModuleType:
    """The Python module a spec points into.

    Raises:
        SpecError: the file or module cannot be found or imported.
    """
    if spec.path is not None:
        return import_file(spec.path, spec.text)
    assert spec.module is not None
    try:
        return usercode.call(importlib.import_module, spec.module, spec=spec.text, action=f"importing {spec.module}")
    except UserCodeError as exc:
        missing = exc.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name and (spec.module + ".").startswith(missing.name + "."):
            raise SpecError(
                f"{spec.text}: no module named {missing.name!r}; check the spec or install the package"
            ) from missing
        raise


def lookup(module: types.ModuleType, attr: str, spec_text: str, what: str) -> object:
    """``module.attr`` (dotted attributes allowed).

    Raises:
        SpecError: nothing of that name, with the names that are there.
    """
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:12]
            raise SpecError(
                f"{spec_text}: {getattr(module, '__file__', module.__name__)} has no {what} named {attr!r}"
                f" (it defines: {', '.join(public) or 'nothing public'})"
            )
        obj = getattr(obj, part)
    return obj


def missing_file(path: Path) -> str:
    """Why ``path`` cannot be read as a file: missing, a folder, or a special file (a FIFO, a device)."""
    if not path.exists():
        return f"file {path} not found; check the path (relative to {Path.cwd()})"
    if path.is_dir():
        return f"{path} is a folder; give a file"
    return f"{path} is not a regular file (a pipe, socket or device); give a file saved on disk"


describe_exception = usercode.describe
