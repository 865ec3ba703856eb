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
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnaudit.findings import Report

__all__ = ["Workspace"]


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

    def __init__(self, source: Path, attr: str, name: str, audit: Mapping[str, Any]) -> None:
        self.source, self.attr, self.name, self.audit_args = source, attr, name, dict(audit)
        self.dir = Path(tempfile.mkdtemp(prefix="bnaudit-fix-"))
        self.count = 0

    def _write(self, text: str, weights: Any) -> tuple[str, Path | None]:
        self.count += 1
        sub = self.dir / str(self.count)
        sub.mkdir()
        copy = sub / self.source.name
        copy.write_text(text, encoding="utf-8")
        if isinstance(weights, Mapping):
            import torch

            path = sub / "weights.pt"
            torch.save(dict(weights), path)
            weights = path
        return f"{copy}:{self.attr}", weights

    def audit(self, text: str, weights: Any) -> Report:
        from bnaudit.api import inspect

        spec, wpath = self._write(text, weights)
        with _on_path(self.source.parent):
            report = inspect(spec, weights=wpath, name=self.name, **self.audit_args)
        return replace(report, source_path=str(self.source))

    def audit_model_file(self, payload: Mapping[str, Any]) -> Report:
        """Audit a bnaudit model file's contents (its ``source`` should name a copy from ``copy``)."""
        import torch

        from bnaudit.api import inspect

        self.count += 1
        path = self.dir / f"model{self.count}.pt"
        torch.save(dict(payload), path)
        args = {k: v for k, v in self.audit_args.items() if k != "trust_pickle"}
        with _on_path(self.source.parent):
            return inspect(str(path), name=self.name, **args)

    def copy(self, text: str) -> str:
        """A fresh copy of ``text``; its model spec."""
        return self._write(text, None)[0]

    def load(self, text: str, weights: Any) -> Any:
        from bnaudit.loading import load_model

        spec, wpath = self._write(text, weights)
        with _on_path(self.source.parent):
            return load_model(spec, weights=wpath, trust_pickle=bool(self.audit_args.get("trust_pickle")))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
