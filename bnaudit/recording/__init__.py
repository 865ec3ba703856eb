"""``bnaudit.record`` and what it produces, one job per module:

- ``recorder``: the hooks and ``step()`` (``record``, ``Recorder``, ``default_layers``);
- ``history``: the recorded table and its accessors (``History``, ``BNModes``, the ``STATS`` names);
- ``layout``: row layouts, their storage, and the merge of recorded moments (Chan's update);
- ``export``: JSON, CSV and the ``.pt`` save file;
- ``reduce``: rows and histories merged across torch.distributed ranks;
- ``measures``: derived measures over a History (drift, signal propagation, dead units...).

Imported by name from here: ``from bnaudit.recording import record, History``."""

from __future__ import annotations

from bnaudit.recording.history import STATS, BNModes, History
from bnaudit.recording.recorder import Recorder, RecordingError, default_layers, record
from bnaudit.recording.reduce import reduce_history, reduce_row

__all__ = ["STATS", "BNModes", "History", "Recorder", "RecordingError", "default_layers", "record", "reduce_history",
           "reduce_row"]
