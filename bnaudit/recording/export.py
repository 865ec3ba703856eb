"""A History's files: JSON, CSV and the ``.pt`` save file that ``History.load`` reads back.

``HistoryExport`` is the History's export half, written against its reading API (``series``, ``bn_modes``,
``steps``...) and its segments. The ``.pt`` file holds tensors and plain types only, so it loads with
``weights_only=True``; its ``schema`` is ``bnaudit.history/2`` (version 1, the layout before the recorder
was rebuilt, is refused with a message saying so)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.errors import UsageError
from bnaudit.files import atomic_write, atomic_write_text
from bnaudit.recording.layout import Layout

__all__ = ["HISTORY_SCHEMA", "HistoryExport"]

HISTORY_SCHEMA = "bnaudit.history/2"
_CSV_COLS = ("calls", "count", "mean", "var", "min", "max", "zero_frac", "nonfinite_frac")


def _fmt(v: float) -> str:
    return "" if v is None or math.isnan(float(v)) else repr(float(v))


def _jsonable(arr: np.ndarray) -> Any:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 1:
        return [None if not math.isfinite(v) else v for v in a.tolist()]
    return [_jsonable(r) for r in a]


class HistoryExport:
    """Export and load for ``History`` (mixed into it)."""

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain lists (the JSON export's shape; NaN as None)."""
        layers = {}
        for name in self.layers:
            entry: dict[str, Any] = dict(self.info[name])
            for stat, arr in self.layer(name).items():
                entry[stat] = _jsonable(arr)
            layers[name] = entry
        bns = {}
        for name in self.bn_layers:
            modes = self.bn_modes(name)
            info = {k: v for k, v in self.bn_info[name].items() if not k.startswith("initial_")}
            bns[name] = {
                **info,
                "training": modes.training.tolist(),
                "requires_grad": modes.requires_grad.tolist(),
                "num_batches_tracked": modes.num_batches_tracked.tolist(),
                "running_mean": _jsonable(self.series(name, "running_mean")),
                "running_var": _jsonable(self.series(name, "running_var")),
            }
        return {
            "schema": HISTORY_SCHEMA,
            "steps": self.steps.tolist(),
            "updated": self.updated.tolist(),
            "model_training": self.model_training,
            "quantile_levels": list(self.quantile_levels),
            "notes": list(self.notes),
            "layers": layers,
            "batchnorm": bns,
        }

    def to_json(self, path: str | Path, *, force: bool = False) -> Path:
        """Write ``to_dict()`` as JSON.

        Raises:
            OutputError: the file exists without ``force``, or its folder is missing.
        """
        return atomic_write_text(path, json.dumps(self.to_dict()), force=force)

    def to_csv(self, path: str | Path, *, force: bool = False) -> Path:
        """Write whole-layer statistics as a long CSV, one row per layer and step: ``step, layer, calls,
        count, mean, var, min, max, zero_frac, nonfinite_frac``, then one row per BatchNorm layer and step with
        ``training, num_batches_tracked, requires_grad`` (per-channel series go to JSON or .pt).

        Raises:
            OutputError: the file exists without ``force``, or its folder is missing.
        """
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("step", "layer", *_CSV_COLS, "training", "num_batches_tracked", "requires_grad"))
        steps = self.steps
        for name in self.layers:
            data = [self.series(name, c) for c in _CSV_COLS]
            for i, step in enumerate(steps):
                w.writerow((int(step), name, *(_fmt(d[i]) for d in data), "", "", ""))
        for name in self.bn_layers:
            m = self.bn_modes(name)
            for i, step in enumerate(steps):
                w.writerow((int(step), name, *([""] * len(_CSV_COLS)), int(m.training[i]),
                            int(m.num_batches_tracked[i]), int(m.requires_grad[i])))
        return atomic_write_text(path, buf.getvalue(), force=force)

    def to_payload(self) -> dict[str, Any]:
        """The save file's content: plain types and tensors (what ``from_payload`` reads back)."""
        import torch

        if self.settle is not None:
            self.settle()
        segs = [{
            "layers": [list(x) for x in s.layout.layers],
            "bns": [list(b) for b in s.layout.bns],
            "values": torch.from_numpy(s.take("values").copy()),
            "ints": torch.from_numpy(s.take("ints").copy()),
            "flags": torch.from_numpy(s.take("flags").copy()),
        } for s in self.segments]
        bn_info = {k: {kk: (torch.from_numpy(vv) if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()}
                   for k, v in self.bn_info.items()}
        return {
            "schema": HISTORY_SCHEMA,
            "chunk": self.chunk,
            "steps": list(self._steps),
            "updated": [bool(u) for u in self._updated],
            "model_training": self.model_training,
            "info": self.info,
            "bn_info": bn_info,
            "quantile_levels": list(self.quantile_levels),
            "notes": list(self.notes),
            "segments": segs,
        }

    @classmethod
    def from_payload(cls, p: dict[str, Any]):
        """A History from ``to_payload``'s content."""
        import torch

        h = cls(chunk=int(p["chunk"]))
        h.info = {k: dict(v) for k, v in p["info"].items()}
        h.bn_info = {k: {kk: (vv.numpy() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
                     for k, v in p["bn_info"].items()}
        h.quantile_levels = tuple(p["quantile_levels"])
        h.notes = list(p["notes"])
        modes = p.get("model_training") or [None] * len(p["steps"])  # absent from files saved before it was kept
        i = 0
        for s in p["segments"]:
            layout = Layout(tuple((str(n), int(c), int(q), bool(m)) for n, c, q, m in s["layers"]),
                            tuple((str(n), int(c)) for n, c in s["bns"]))
            values, ints, flags = s["values"].numpy(), s["ints"].numpy(), s["flags"].numpy()
            for r in range(len(values)):
                v, n, f = h.append(layout, int(p["steps"][i]), bool(p["updated"][i]), modes[i])
                v[:], n[:], f[:] = values[r], ints[r], flags[r]
                i += 1
        return h

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the history as a ``.pt`` file that ``History.load`` reads back (tensors and plain types
        only, so it loads with ``weights_only=True``).

        Raises:
            OutputError: the file exists without ``force``, or its folder is missing.
        """
        import torch

        payload = self.to_payload()
        return atomic_write(path, lambda tmp: torch.save(payload, tmp), force=force)

    @classmethod
    def load(cls, path: str | Path):
        """Read a history written by ``save``.

        Raises:
            UsageError: the file is missing or is not a bnaudit history (of this version).
        """
        import torch

        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: no such history file; write one with History.save()")
        try:
            payload = torch.load(p, weights_only=True)
        except Exception as exc:
            raise UsageError(f"{p}: not a readable bnaudit history ({type(exc).__name__}); write one with "
                             "History.save()") from exc
        schema = payload.get("schema") if isinstance(payload, dict) else None
        if schema == "bnaudit.history/1":
            raise UsageError(f"{p}: a history saved by an older bnaudit (bnaudit.history/1); record it again")
        if schema != HISTORY_SCHEMA:
            raise UsageError(f"{p}: not a bnaudit history file (schema {HISTORY_SCHEMA} expected)")
        return cls.from_payload(payload)
