"""The command-line interface. ``app`` lives in ``bnaudit.cli.app``; importing this package registers
every command module on it. Add a command module to ``_COMMANDS`` to expose it."""

from __future__ import annotations

import importlib

from bnaudit.cli.app import app

_COMMANDS = ("inspect", "rules", "check", "transforms", "recalibrate", "train_compare", "watch", "fix")

for _name in _COMMANDS:
    importlib.import_module(f"bnaudit.cli.{_name}")


def main() -> None:
    app()


__all__ = ["app", "main"]
