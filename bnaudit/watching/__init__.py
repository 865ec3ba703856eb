"""``bnaudit watch``: audit a user's own training program while it runs, with no change to its code.

- ``runner``: run a script or module in-process exactly as ``python`` would (argv, sys.path[0], ``__main__``,
  exit status and traceback passed through);
- ``discovery``: find the trained models from torch's global optimizer step hooks;
- ``live``: the checks made while it trains (BN202, BN306, BN307), each with the user's file:line;
- ``history_checks``: the checks made on the recorded history at the end (BN203, BN206-BN209);
- ``session``: ``bnaudit.watch()``, the context manager the API and the CLI both use;
- ``outputs``: the output folder (report.json, report.html, histories, plots).

Imported by name from here: ``from bnaudit.watching import watch, run_program``."""

from __future__ import annotations

from bnaudit.watching.runner import Outcome, finish, run_program
from bnaudit.watching.session import LIVE_CODES, WATCH_CODES, Watch, WatchedModel, watch

__all__ = ["LIVE_CODES", "WATCH_CODES", "Outcome", "Watch", "WatchedModel", "finish", "run_program", "watch"]
