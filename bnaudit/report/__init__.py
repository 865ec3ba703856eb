"""Renderers of Reports: one module per output format, each exposing ``render(reports, **opts) -> str``.

``FORMATS`` maps a format name to its module; ``render`` imports it lazily. ``auto`` picks ``github`` inside
GitHub Actions (GITHUB_ACTIONS=true), else ``rich``."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from bnaudit.errors import UsageError
from bnaudit.findings import Report

FORMATS: dict[str, str] = {
    "rich": "bnaudit.report.console",
    "json": "bnaudit.report.json_",
    "sarif": "bnaudit.report.sarif",
    "junit": "bnaudit.report.junit",
    "github": "bnaudit.report.github",
    "markdown": "bnaudit.report.markdown",
}
FORMAT_CHOICES = ("auto", *FORMATS)


def resolve_format(fmt: str) -> str:
    """The concrete format for ``fmt`` (``auto`` decided from the environment).

    Raises:
        UsageError: an unknown format name.
    """
    if fmt == "auto":
        return "github" if os.environ.get("GITHUB_ACTIONS") == "true" else "rich"
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    return fmt


def render(reports: Report | Sequence[Report], fmt: str = "rich", **opts: Any) -> str:
    """Render one or several reports in ``fmt``.

    Raises:
        UsageError: an unknown format, or one whose module is not available.
    """
    name = resolve_format(fmt)
    try:
        module = importlib.import_module(FORMATS[name])
    except ModuleNotFoundError as exc:
        raise UsageError(f"format {name!r} is not available in this installation ({exc.name})") from exc
    items = [reports] if isinstance(reports, Report) else list(reports)
    return module.render(items, **opts)
