"""Temporary copies of the model's file (and checkpoint) that ``bnaudit fix`` audits and loads.

Every audit, the first included, runs on a fresh copy in a private temporary folder, with the file's own
folder on ``sys.path`` so that its imports resolve as before: Python caches an imported file by its path, so
auditing the user's path twice in one process would see the first version. The user's files are never
written here."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnaudit.findings import Report

__all__ = ["ModelFileWorkspace", "Workspace"]


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    text = str(folder)
    added = text not in sys.path
    if added:
        sys.path.insert(0, text)
    try:
        yield
    finally:
        if added and text in sys.path:
            sys.path.remove(text)


class Workspace:
    """Fresh temporary copies of the model's file (and checkpoint) to audit or load."""

    def __init__(self, source: Path, attr: str, name: str, audit: Mapping[str, Any],
                 inspect: Callable[..., Report]) -> None:
        self.source, self.attr, self.name, self.audit_args = source, attr, name, dict(audit)
        self.inspect = inspect
        self.dir = Path(tempfile.mkdtemp(prefix="bnaudit-fix-"))
        self.count = 0

    def _folder(self) -> Path:
        self.count += 1
        sub = self.dir / str(self.count)
        sub.mkdir()
        return sub

    def _weights(self, folder: Path, weights: Any) -> Any:
        """A state_dict saved into ``folder`` (a path or None is returned as it is)."""
        if isinstance(weights, Mapping):
            import torch

            path = folder / "weights.pt"
            torch.save(dict(weights), path)
            return path
        return weights

    def _write(self, text: str, weights: Any) -> tuple[str, Path | None]:
        sub = self._folder()
        copy = sub / self.source.name
        copy.write_text(text, encoding="utf-8")
        return f"{copy}:{self.attr}", self._weights(sub, weights)

    def audit(self, text: str, weights: Any) -> Report:
        spec, wpath = self._write(text, weights)
        with _on_path(self.source.parent):
            report = self.inspect(spec, weights=wpath, name=self.name, **self.audit_args)
        return replace(report, source_path=str(self.source))

    def audit_model_file(self, payload: Mapping[str, Any]) -> Report:
        """Audit a bnaudit model file's contents (its ``source`` should name a copy from ``copy``)."""
        import torch

        self.count += 1
        path = self.dir / f"model{self.count}.pt"
        torch.save(dict(payload), path)
        args = {k: v for k, v in self.audit_args.items() if k != "trust_pickle"}
        with _on_path(self.source.parent):
            return self.inspect(str(path), name=self.name, **args)

    def copy(self, text: str) -> str:
        """A fresh copy of ``text``; its model spec."""
        return self._write(text, None)[0]

    def load(self, text: str, weights: Any) -> Any:
        from bnaudit.loading import load_model

        spec, wpath = self._write(text, weights)
        with _on_path(self.source.parent):
            return load_model(spec, weights=wpath, trust_pickle=bool(self.audit_args.get("trust_pickle")))

    def close(self) -> None:
        from bnaudit.loading.specs import forget_files

        forget_files(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


class ModelFileWorkspace(Workspace):
    """The same for a bnaudit model file (``.pt``): there is no source to copy, the checkpoint is its
    state_dict, and the text arguments are ignored."""

    def __init__(self, model_file: Path, name: str, audit: Mapping[str, Any],
                 inspect: Callable[..., Report]) -> None:
        super().__init__(model_file, "", name, audit, inspect)

    def _write(self, text: str, weights: Any) -> tuple[str, Path | None]:
        return str(self.source), self._weights(self._folder(), weights)

    def copy(self, text: str) -> str:
        return str(self.source)
