"""Row layouts and the segments that store rows of one layout (the History's storage).

Per recorded layer a row holds ``channel_mean (C) | channel_var (C) | min | max | nonzero | nonfinite |
quantiles``; per BatchNorm layer ``running_mean (C) | running_var (C) | num_batches_tracked``. A segment keeps
rows of one layout in preallocated host chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EXTRA", "Layout", "Segment", "collapse", "merge_blocks"]

# Per recorded layer, the values of a row block after its 2C channel columns: min, max, nonzero, nonfinite.
EXTRA = 4


@dataclass(frozen=True)
class Layout:
    """One row structure.

    Attributes:
        layers: per recorded layer present in the row: (name, channels C, quantile values, mixed). ``mixed``
            marks a layer whose calls in the step came at several widths: its one "channel" is then the
            whole tensor, and its channel series read as NaN there.
        bns: per BatchNorm layer: (name, channels whose buffers are kept; 0: only the counter; -1: nothing,
            it tracks no running statistics).
    """

    layers: tuple[tuple[str, int, int, bool], ...]
    bns: tuple[tuple[str, int], ...]
    at: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)  # layer -> (index, column)
    bn_at: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)
    width: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        at, pos = {}, 0
        for k, (name, c, qu, _) in enumerate(self.layers):
            at[name] = (k, pos)
            pos += 2 * c + EXTRA + qu
        bn_at = {}
        for k, (name, c) in enumerate(self.bns):
            bn_at[name] = (k, pos)
            pos += 2 * c + 1 if c >= 0 else 0
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "bn_at", bn_at)
        object.__setattr__(self, "width", pos)


class Segment:
    """Rows recorded under one layout, in preallocated chunks that grow 16, 32, ... up to ``chunk`` rows."""

    def __init__(self, layout: Layout, chunk: int):
        self.layout, self.chunk = layout, chunk
        self.values: list[np.ndarray] = []  # (rows, width) float32
        self.ints: list[np.ndarray] = []  # (rows, layers, 2) int64: calls, values per channel
        self.flags: list[np.ndarray] = []  # (rows, bns, 2) bool: training, requires_grad
        self.rows = 0
        self._cap = 0
        self._taken: dict[str, tuple[int, np.ndarray]] = {}  # which -> (rows when gathered, the rows)

    def next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of a new row's values, ints and flags, to be filled in."""
        if self.rows == self._cap:
            size = min(self.chunk, max(16, self._cap))
            lay = self.layout
            self.values.append(np.zeros((size, lay.width), dtype=np.float32))
            self.ints.append(np.zeros((size, len(lay.layers), 2), dtype=np.int64))
            self.flags.append(np.zeros((size, len(lay.bns), 2), dtype=bool))
            self._cap += size
        r = self.rows - (self._cap - len(self.values[-1]))
        self.rows += 1
        return self.values[-1][r], self.ints[-1][r], self.flags[-1][r]

    def take(self, which: str) -> np.ndarray:
        """All rows of ``values``, ``ints`` or ``flags`` as one array (gathered once per row count; do not
        write into it)."""
        got = self._taken.get(which)
        if got is None or got[0] != self.rows:
            chunks = getattr(self, which)
            if chunks:
                arr = np.concatenate(chunks, axis=0)[: self.rows]
            else:
                lay = self.layout
                shape = {"values": (0, lay.width), "ints": (0, len(lay.layers), 2), "flags": (0, len(lay.bns), 2)}
                arr = np.zeros(shape[which], dtype={"values": np.float32, "ints": np.int64, "flags": bool}[which])
            got = self._taken[which] = (self.rows, arr)
        return got[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for group in (self.values, self.ints, self.flags) for a in group)


def merge_blocks(n_a: Any, a: np.ndarray, n_b: Any, b: np.ndarray) -> tuple[Any, np.ndarray]:
    """Merge two samples' row blocks (``mean (C) | var (C) | min | max | nonzero | nonfinite``, float64, any
    leading dimensions) holding ``n_a`` and ``n_b`` values per channel: Chan, Golub & LeVeque's update for
    the moments, extremes over both, counts added. A side with no values leaves the other as it is."""
    c = (a.shape[-1] - EXTRA) // 2
    n_a, n_b = np.asarray(n_a, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
    n = n_a + n_b
    has_a, has_b = (n_a > 0)[..., None], (n_b > 0)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        wa, wb = (n_a / n)[..., None], (n_b / n)[..., None]
        ma, va, mb, vb = a[..., :c], a[..., c: 2 * c], b[..., :c], b[..., c: 2 * c]
        delta = mb - ma
        mean = ma + delta * wb
        var = va * wa + vb * wb + delta * delta * wa * wb
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    out[..., :c] = mean
    out[..., c: 2 * c] = var
    out[..., 2 * c] = np.minimum(a[..., 2 * c], b[..., 2 * c])
    out[..., 2 * c + 1] = np.maximum(a[..., 2 * c + 1], b[..., 2 * c + 1])
    out[..., 2 * c + 2:] = a[..., 2 * c + 2:] + b[..., 2 * c + 2:]
    out = np.where(has_a & has_b, out, np.where(has_a, a, b))
    return (n if n.ndim else float(n)), out


def collapse(n: int, block: np.ndarray, c: int) -> tuple[int, np.ndarray]:
    """A row block of ``c`` channels with ``n`` values each as one channel of ``n * c`` values: the mean of the
    channel means; the mean within-channel variance plus the variance of the channel means. (Plain ufuncs:
    ``np.mean``/``np.var`` cost several times more on arrays this small; NaN/Inf warnings are the caller's.)"""
    cm = block[:c]
    mu = cm.sum() / c
    out = np.empty(2 + EXTRA)
    out[0] = mu
    out[1] = (block[c: 2 * c].sum() + ((cm - mu) ** 2).sum()) / c
    out[2:] = block[2 * c:]
    return n * c, out
