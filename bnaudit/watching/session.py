"""``bnaudit.watch()``: find the models a program trains and record them, with no change to its code.

    with bnaudit.watch() as w:
        train()                      # any loop, Lightning, the Hugging Face Trainer: all call optimizer.step()
    for report in w.reports: ...     # one Report per trained model
    w.write("bnaudit-watch")         # report.json, report.html, histories and plots

Inside the block torch's global optimizer step hooks are installed. At an optimizer's first step its
parameters name the model(s) it trains (``discovery``); each gets a ``bnaudit.record`` Recorder (the same
recorder, the same cost) and the live checks (``live``). Every later step of that optimizer ends one recorded
step of the model: step 0 is the first ``optimizer.step()``, whose forward passes came before discovery (its
row holds the BatchNorm buffers and modes only). After ``max_steps`` steps a model is no longer recorded and the
program runs on unhooked. On exit (normal, an exception, Ctrl-C) every hook is removed, the recorders are
closed and the histories kept; the end-of-run checks (``history_checks``) then make the reports.

A torch.compile'd model skips module hooks added after its first call: it gets one note saying so and only the
optimizer-step check (BN307). Inside a torch.distributed process group each rank watches its own process;
``reduce=True`` merges the recorded statistics across ranks at every step, as ``record(reduce=True)`` does."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.findings import Report, sort_findings
from bnaudit.recording import History, Recorder, RecordingError
from bnaudit.rules.catalog import select_rules
from bnaudit.watching.discovery import find_roots, model_name
from bnaudit.watching.history_checks import CODES as HISTORY_CODES
from bnaudit.watching.history_checks import history_findings
from bnaudit.watching.live import LiveChecks

__all__ = ["LIVE_CODES", "WATCH_CODES", "Watch", "WatchedModel", "watch"]

LIVE_CODES = ("BN202", "BN306", "BN307")
WATCH_CODES = tuple(sorted((*LIVE_CODES, *HISTORY_CODES)))


@dataclass
class WatchedModel:
    """One model found training: its name, module, recorder, live checks and how far it got.

    Attributes:
        name: the class name (with ``-2``... when two watched models share it).
        model: the user's module (unwrapped from DDP / torch.compile).
        optimizer: the class name of the optimizer whose steps count as this model's steps.
        steps: optimizer steps seen so far.
        notes: what could not be watched and why.
    """

    name: str
    model: nn.Module
    optimizer: str
    live: LiveChecks
    recorder: Recorder | None = None
    steps: int = 0
    compiled: bool = False
    notes: list[str] = field(default_factory=list)
    _history: History | None = None
    _stopped: bool = False

    @property
    def history(self) -> History:
        """The recorded history (empty when nothing could be recorded)."""
        if self.recorder is not None:
            return self.recorder.history
        if self._history is None:
            self._history = History()
        return self._history

    def stop(self) -> None:
        """Remove every hook of this model; the history stays readable."""
        if self._stopped:
            return
        self._stopped = True
        self.live.detach()
        if self.recorder is not None:
            try:
                self.recorder.__exit__(None, None, None)
            except Exception as exc:  # noqa: BLE001 - the hooks are gone either way; say why the end is missing
                self.notes.append(f"recording stopped: {exc}")


class Watch:
    """Made by ``bnaudit.watch()``: a context manager that finds and records every model trained inside it.

    Attributes:
        models: the models found, in the order of their first optimizer step.
        reports: one Report per model (after the block).
    """

    def __init__(self, *, layers: Iterable[str] | None = None, every: int = 1, max_steps: int | None = None,
                 reduce: bool = False, select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
                 rule_config: Mapping[str, Mapping[str, Any]] | None = None, only: Iterable[Any] | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UsageError(f"every must be a positive integer, got {every!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise UsageError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.layers = list(layers) if layers else None
        self.every, self.max_steps, self.reduce = every, max_steps, reduce
        self.only = None if only is None else list(only)
        self.rules = self._rules(select, ignore, rule_config or {})
        self.models: list[WatchedModel] = []
        self.notes: list[str] = []
        self.reports: list[Report] = []
        self.rank = 0
        self._by_opt: dict[int, tuple[Any, list[WatchedModel], list[WatchedModel]]] = {}
        self._handles: list[Any] = []
        self._open = False

    @staticmethod
    def _rules(select: Any, ignore: Any, config: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        out = {}
        for cls in select_rules(select, ignore):
            if cls.code in WATCH_CODES:
                cfg = config.get(cls.code) or config.get(cls.name) or {}
                out[cls.code] = cls(severity=cfg.get("severity"), options=cfg.get("options"))
        return out

    # -- the block --
    def __enter__(self) -> Self:
        if self._open:
            raise UsageError("this watch is already open; make a new one with bnaudit.watch()")
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._open = True
        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook, close the recorders and make the reports (called on leaving the block)."""
        if not self._open:
            return
        self._open = False
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        for w in self.models:
            w.stop()
        self._by_opt.clear()  # the optimizers are the user's: hold them no longer than the block
        self.reports = [self._report(w) for w in self.models]

    # -- optimizer hooks --
    def _ignored(self, opt: Any) -> bool:
        return self.only is not None and not any(opt is o for o in self.only)

    def _entry(self, opt: Any) -> tuple[list[WatchedModel], list[WatchedModel]] | None:
        got = self._by_opt.get(id(opt))
        return (got[1], got[2]) if got is not None and got[0] is opt else None

    def _pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        entry = self._entry(opt)
        if entry is None or self._ignored(opt):
            return
        for w in entry[0]:
            if not w._stopped:
                w.live.before_step()  # catches its own errors

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        if self._ignored(opt):
            return
        entry = self._entry(opt)
        if entry is None:
            self._discover(opt)
            return
        for w in entry[0]:
            try:
                self._end_step(w)
            except Exception as exc:  # noqa: BLE001 - never break the user's training: stop watching this model
                w.notes.append(f"{w.name}: watching stopped at step {w.steps} ({type(exc).__name__}: {exc})")
                self._drop_recorder(w)
                w.stop()

    def _discover(self, opt: Any) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        clocked: list[WatchedModel] = []
        joined: list[WatchedModel] = []
        try:
            roots = find_roots(params)
        except Exception as exc:  # noqa: BLE001 - discovery must never break the user's training
            self.notes.append(f"{type(opt).__name__}: could not find its model ({type(exc).__name__}: {exc})")
            roots = []
        if not roots:
            self.notes.append(f"{type(opt).__name__}: its parameters belong to no nn.Module; not watched")
        for model, compiled in roots:
            known = next((w for w in self.models if w.model is model), None)
            if known is not None:
                joined.append(known)
                continue
            w = self._start(model, type(opt).__name__, compiled)
            clocked.append(w)
        self._by_opt[id(opt)] = (opt, clocked, joined)

    def _start(self, model: nn.Module, optimizer: str, compiled: bool) -> WatchedModel:
        name = model_name(model, [m.name for m in self.models])
        holder: list[WatchedModel] = []
        live = LiveChecks(model, {c: r for c, r in self.rules.items() if c in LIVE_CODES}, lambda: holder[0].steps)
        w = WatchedModel(name=name, model=model, optimizer=optimizer, live=live, compiled=compiled)
        holder.append(w)
        self.models.append(w)
        self._rank()
        if compiled:
            w.notes.append(f"{name} is torch.compile'd: the compiled graph skips module hooks, so its layers are not "
                           "recorded and only the optimizer-step check (BN307) runs; watch the uncompiled model "
                           "to record it")
        else:
            try:
                rec = Recorder(model, layers=self.layers, every=self.every, reduce=self.reduce)
                rec.__enter__()
                w.recorder = rec
                rec.step()  # step 0: its forward passes came before discovery; this row holds the buffers
            except Exception as exc:  # noqa: BLE001 - a bad --layers or an odd model: note it, train on
                w.notes.append(f"{name} is not recorded: {exc}")
                self._drop_recorder(w)
        live.attach()
        w.steps = 1
        self._check_max(w)
        return w

    def _end_step(self, w: WatchedModel) -> None:
        if w._stopped:
            w.steps += 1
            return
        if w.recorder is not None:
            try:
                w.recorder.step()
            except RecordingError as exc:  # hooks that never fire (a model compiled after it was found)
                w.notes.append(f"{w.name}: recording stopped at step {w.steps}: {exc}")
                self._drop_recorder(w)
        w.steps += 1
        self._check_max(w)

    def _drop_recorder(self, w: WatchedModel) -> None:
        rec, w.recorder = w.recorder, None
        w._history = rec.history if rec is not None else None
        if rec is not None:
            try:
                rec.__exit__(RuntimeError, None, None)  # closes without the fired-hooks check
            except Exception:  # noqa: BLE001, S110
                pass

    def _check_max(self, w: WatchedModel) -> None:
        if self.max_steps is not None and w.steps >= self.max_steps and not w._stopped:
            w.stop()
            w.notes.append(f"{w.name}: recorded the first {self.max_steps} steps (--max-steps); the rest ran unrecorded")

    def _rank(self) -> None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self.rank = dist.get_rank()
                return
        except (ImportError, RuntimeError):
            pass
        self.rank = int(os.environ.get("RANK", "0") or 0)

    # -- reports --
    def _report(self, w: WatchedModel) -> Report:
        findings = w.live.findings()
        history = w.history
        ends, skipped = history_findings(w.model, history, self.rules, w.live.location_at, w.live.output_layers)
        findings += ends
        findings = [f if f.audit else replace(f, audit=w.name) for f in findings]
        notes = [*w.notes, *w.live.errors, *history.notes]
        meta = {"steps": w.steps, "recorded_steps": len(history), "optimizer": w.optimizer, "every": self.every,
                "layers_recorded": len(history.layers), "batchnorm_layers": len(history.bn_layers),
                "rank": self.rank, "torch": torch.__version__}
        if self.max_steps is not None:
            meta["max_steps"] = self.max_steps
        if notes:
            meta["notes"] = notes
        return Report(model=w.name, findings=sort_findings(findings), graph_method="none",
                      graph_note="bnaudit watch: recorded while the program trained",
                      rules_run=tuple(c for c in self.rules if c not in skipped), rules_skipped=skipped, meta=meta)

    def write(self, out: str | Path, *, force: bool = False, program: Mapping[str, Any] | None = None,
              plots: bool = True) -> Path:
        """Write the output folder (``report.json``, ``report.html``, per model ``NAME.history.pt`` and
        ``.csv`` and the plots); see ``bnaudit.watching.outputs.write_outputs``."""
        from bnaudit.watching.outputs import write_outputs

        if self._open:
            raise UsageError("write() after the `with bnaudit.watch()` block has ended")
        return write_outputs(self, Path(out), force=force, program=program or {}, plots=plots)


def watch(*, layers: Iterable[str] | None = None, every: int = 1, max_steps: int | None = None, reduce: bool = False,
          select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
          rule_config: Mapping[str, Mapping[str, Any]] | None = None, only: Iterable[Any] | None = None) -> Watch:
    """Find every model trained inside the block (by its ``optimizer.step()`` calls) and record it.

    Use as ``with bnaudit.watch() as w: train()``; then ``w.reports`` (one Report per model, findings with
    ``step`` and ``location``), ``w.models[i].history`` and ``w.write(folder)``. The module docstring says
    how models are found and what is checked.

    Args:
        layers: module names or globs to record (default: ``record``'s defaults), for every model.
        every: record one step in ``every``.
        max_steps: stop recording a model after this many of its steps (the program runs on).
        reduce: inside a process group, merge statistics across ranks at every step.
        select: rule codes/prefixes/names to check (default: all that watch runs: BN202, BN203, BN206-BN209,
            BN306, BN307).
        ignore: rule codes/prefixes/names to skip.
        rule_config: code -> {"severity": ..., "options": {...}}, as ``bnaudit check`` configures rules.
        only: watch only the models of these optimizers (default: every optimizer that steps).

    Returns:
        A Watch (a context manager).

    Raises:
        UsageError: invalid ``every``/``max_steps`` or unknown rule codes.
    """
    return Watch(layers=layers, every=every, max_steps=max_steps, reduce=reduce, select=select, ignore=ignore,
                 rule_config=rule_config, only=only)
