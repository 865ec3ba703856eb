"""The records a comparison produces: one RunResult per (variant, lr, batch size, seed), the per-cell
summary across seeds (mean ± std), and CompareResult with the settings, the verdict and ``to_dict()`` for
``--format json``. Plain dataclasses, no torch: renderers and plots read them without loading a model."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


def _round(x: Any, nd: int = 6) -> Any:
    if isinstance(x, float):
        return round(x, nd) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    return x


@dataclass
class RunResult:
    """One training run.

    Attributes:
        variant, lr, batch_size, seed: the cell and seed.
        losses: training loss at every step (None for a non-finite value).
        val_steps, val_losses, val_accuracies: validation curve (step 0, every ``eval_every`` steps, the end).
        final_loss: mean training loss over the last ``window`` steps (None when the run diverged).
        val_loss, val_accuracy: the last validation measurement (None when diverged; accuracy None for MSE).
        steps_to_target: first step whose trailing-mean training loss is <= the target (None: not reached).
        diverged, diverged_at, divergence: NaN/Inf or loss explosion, the step, and why.
        grad_norms: ``{"steps": [...], "layers": {name: [...]}}``.
        percentiles: Fig. 1 percentiles of one unit's input (``layer``, ``unit``, ``steps``, ``p15``...).
        drift: per-layer activation drift from ``bnaudit.record`` (``steps``, ``layers``) or None.
        ics: Santurkar et al. gradient ICS for one layer, or None.
        seconds: wall time of the run. steps_run: optimizer steps taken. notes: anything worth knowing.
    """

    variant: str
    lr: float
    batch_size: int
    seed: int
    losses: list[float | None] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float | None] = field(default_factory=list)
    val_accuracies: list[float | None] = field(default_factory=list)
    final_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    steps_to_target: int | None = None
    diverged: bool = False
    diverged_at: int | None = None
    divergence: str | None = None
    grad_norms: dict[str, Any] = field(default_factory=dict)
    percentiles: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    ics: dict[str, Any] | None = None
    seconds: float = 0.0
    steps_run: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def cell(self) -> tuple[str, float, int]:
        return (self.variant, self.lr, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return _round(
            {
                "variant": self.variant,
                "lr": self.lr,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "losses": self.losses,
                "final_loss": self.final_loss,
                "val_loss": self.val_loss,
                "val_accuracy": self.val_accuracy,
                "steps_to_target": self.steps_to_target,
                "diverged": self.diverged,
                "diverged_at": self.diverged_at,
                "divergence": self.divergence,
                "val_curve": {"steps": self.val_steps, "loss": self.val_losses, "accuracy": self.val_accuracies},
                "grad_norms": self.grad_norms,
                "percentiles": self.percentiles,
                "drift": self.drift,
                "ics": self.ics,
                "seconds": self.seconds,
                "steps_run": self.steps_run,
                "notes": self.notes,
            }
        )


@dataclass(frozen=True)
class Stat:
    """Mean ± std (population std over seeds: the spread actually seen) of the values that exist, and n."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return cls(None, None, 0)
        return cls(statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0, len(vals))

    def to_dict(self) -> dict[str, Any]:
        return _round({"mean": self.mean, "std": self.std, "n": self.n})


@dataclass(frozen=True)
class CellSummary:
    """All seeds of one (variant, lr, batch size) cell."""

    variant: str
    lr: float
    batch_size: int
    seeds: int
    diverged: int
    reached: int
    steps_to_target: Stat
    final_loss: Stat
    val_loss: Stat
    val_accuracy: Stat
    seconds: Stat

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seeds": self.seeds,
            "diverged": self.diverged,
            "reached_target": self.reached,
            "steps_to_target": self.steps_to_target.to_dict(),
            "final_loss": self.final_loss.to_dict(),
            "val_loss": self.val_loss.to_dict(),
            "val_accuracy": self.val_accuracy.to_dict(),
            "seconds": self.seconds.to_dict(),
        }


def summarize(runs: Sequence[RunResult]) -> list[CellSummary]:
    """Group runs by cell (in first-seen order) and reduce across seeds."""
    cells: dict[tuple[str, float, int], list[RunResult]] = {}
    for r in runs:
        cells.setdefault(r.cell, []).append(r)
    out = []
    for (variant, lr, bs), rs in cells.items():
        out.append(
            CellSummary(
                variant=variant,
                lr=lr,
                batch_size=bs,
                seeds=len(rs),
                diverged=sum(r.diverged for r in rs),
                reached=sum(r.steps_to_target is not None for r in rs),
                steps_to_target=Stat.of(
                    float(r.steps_to_target) if r.steps_to_target is not None else None for r in rs
                ),
                final_loss=Stat.of(r.final_loss for r in rs),
                val_loss=Stat.of(r.val_loss for r in rs),
                val_accuracy=Stat.of(r.val_accuracy for r in rs),
                seconds=Stat.of(r.seconds for r in rs),
            )
        )
    return out


def best_cells(cells: Sequence[CellSummary]) -> dict[str, tuple[str, float, int] | None]:
    """The cells to highlight: best validation accuracy (or lowest validation loss for regression), fewest
    steps to target (among cells where every seed reached it), lowest final training loss."""

    def key(c: CellSummary) -> tuple[str, float, int]:
        return (c.variant, c.lr, c.batch_size)

    ok = [c for c in cells if c.diverged == 0]
    best: dict[str, tuple[str, float, int] | None] = {
        "val_accuracy": None,
        "val_loss": None,
        "steps_to_target": None,
        "final_loss": None,
    }
    acc = [c for c in ok if c.val_accuracy.mean is not None]
    if acc:
        best["val_accuracy"] = key(max(acc, key=lambda c: c.val_accuracy.mean or 0.0))
    vl = [c for c in ok if c.val_loss.mean is not None]
    if vl:
        best["val_loss"] = key(min(vl, key=lambda c: c.val_loss.mean or 0.0))
    reached = [c for c in ok if c.reached == c.seeds and c.steps_to_target.mean is not None]
    if reached:
        best["steps_to_target"] = key(min(reached, key=lambda c: c.steps_to_target.mean or 0.0))
    fl = [c for c in ok if c.final_loss.mean is not None]
    if fl:
        best["final_loss"] = key(min(fl, key=lambda c: c.final_loss.mean or 0.0))
    return best


@dataclass
class CompareResult:
    """Everything a comparison produced.

    Attributes:
        settings: the settings used (variants, lrs, batch sizes, seeds, steps, optimizer, loss, target...).
        runs: every RunResult, in run order.
        cells: per-cell summaries across seeds.
        verdict: sentences in plain words, each grounded in the numbers.
        notes: warnings and facts about the setup (e.g. what insert_bn changed, layers not re-initialised).
        unavailable: variants that could not train here, each with the reason (e.g. SyncBatchNorm on CPU
            with ``nproc > 1``); they have no runs.
    """

    settings: dict[str, Any]
    runs: list[RunResult]
    cells: list[CellSummary]
    verdict: list[str]
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, tuple[str, float, int] | None]:
        return best_cells(self.cells)

    def runs_of(
        self, variant: str | None = None, lr: float | None = None, batch_size: int | None = None
    ) -> list[RunResult]:
        return [
            r
            for r in self.runs
            if (variant is None or r.variant == variant)
            and (lr is None or r.lr == lr)
            and (batch_size is None or r.batch_size == batch_size)
        ]

    def cell(self, variant: str, lr: float, batch_size: int) -> CellSummary | None:
        for c in self.cells:
            if (c.variant, c.lr, c.batch_size) == (variant, lr, batch_size):
                return c
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "train-compare",
            "settings": _round(self.settings),
            "summary": [c.to_dict() for c in self.cells],
            "best": {k: (list(v) if v else None) for k, v in self.best.items()},
            "verdict": list(self.verdict),
            "notes": list(self.notes),
            "unavailable": dict(self.unavailable),
            "runs": [r.to_dict() for r in self.runs],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
