"""The checks ``bnaudit watch`` makes while the user's script trains, each pointing at the user's own line.

Per watched model, a forward pre-hook on every BatchNorm layer and one optimizer-step check:

- **BN306** (live): a train-mode BatchNorm that tracks running statistics runs a forward with autograd off
  (``torch.no_grad()`` or ``torch.inference_mode()``): an evaluation loop that forgot ``model.eval()`` is
  updating the running statistics with evaluation data. Reported once per line of the user's code, unless
  that line ran such a forward in at least half of the model's optimizer steps (four or more): a forward in
  nearly every step is part of the training recipe (a GAN that makes the discriminator's fake batch under
  ``torch.no_grad()``), not an evaluation loop, which runs at some steps only (once an epoch, every k steps).
  A BatchNorm whose momentum is None or 1 is re-estimating its statistics on purpose (``update_bn``, precise
  BN) and is passed over.
- **BN202** (live): a train-mode forward gives a BatchNorm fewer than ``min_values`` values per channel (an
  epoch's short last batch); below 2 it is an error (torch itself raises then).
- **BN307** (live): an optimizer step of the model, itself in eval mode, while one of its trainable BatchNorm
  layers is in eval mode and its ``num_batches_tracked`` did not move since the previous step (the rule's own
  confirmation). A model in train mode whose BatchNorm layers were set to eval one by one (``model.train()``
  then ``bn.eval()``: fine-tuning with fixed statistics, mmdetection's ``norm_eval``) is doing it on purpose.

The first forwards after the model is found also note its output layers (those whose output tensor is what the
model returns, or becomes it through parameter-free one-input operations such as ``log_softmax`` or
``squeeze``): the end-of-run drift check (BN206) passes over them, as a classifier's logits are meant to move.

Each is a Finding from the registered rule (its code, name, severity, options and fix), with ``step`` (the
model's optimizer step during which it happened, counted from 0) and ``location``: ``file:line`` of the
innermost frame of the call stack that is the user's code, not torch's, bnaudit's or the standard library's.

Cost: the BatchNorm hook reads two flags and a shape per call; the stack is walked only when a check fires
(and once per step for the model's first forward, which is where a non-finite value is attributed)."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from bnaudit.findings import Finding
from bnaudit.layers import is_batchnorm

__all__ = ["LiveChecks", "is_user_file", "user_location"]


@lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    import bnaudit

    dirs = {os.path.dirname(os.path.abspath(bnaudit.__file__)), os.path.dirname(os.path.abspath(torch.__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.realpath(path))
            dirs.add(os.path.abspath(path))
    return tuple(sorted(d.rstrip(os.sep) + os.sep for d in dirs))


@lru_cache(maxsize=4096)
def is_user_file(filename: str) -> bool:
    """Whether code from ``filename`` is the user's: a real file outside bnaudit, torch, the standard
    library and installed packages."""
    if not filename or filename.startswith("<"):
        return False
    full = os.path.abspath(filename)
    return not (full.startswith(_library_dirs()) or os.path.realpath(full).startswith(_library_dirs()))


def user_location(depth: int = 1) -> str | None:
    """``file:line`` of the innermost frame of the current call stack in the user's code (None: none).

    A module's own ``forward`` is passed over, even when the user wrote it: the line wanted is where the
    model was called (the evaluation loop, the training loop), not the layer inside it."""
    frame: Any = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        if is_user_file(code.co_filename) and not (
                code.co_name == "forward" and isinstance(frame.f_locals.get("self"), nn.Module)):
            return f"{code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@dataclass
class _Event:
    """Occurrences of one live check at one place: the first step, how often, which layers."""

    first_step: int
    location: str | None
    last_step: int = 0
    count: int = 0
    steps: set[int] = field(default_factory=set)
    layers: dict[str, None] = field(default_factory=dict)  # ordered set
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, step: int, layer: str | None) -> None:
        self.last_step, self.count = step, self.count + 1
        self.steps.add(step)
        if layer is not None:
            self.layers.setdefault(layer)


def _trainable(m: nn.Module, model_trains: bool) -> bool:
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, torch.Tensor)]
    if not params:  # nothing of its own trains: it is part of whatever the model trains
        return model_trains
    return any(p.requires_grad for p in params)


def _recalibrating(m: nn.Module) -> bool:
    """Whether a BatchNorm is set up to re-estimate its running statistics on purpose: a cumulative average
    (momentum None: ``torch.optim.swa_utils.update_bn``) or the last batch only (momentum 1: fvcore's precise
    BN, which averages the batches itself). Ordinary training uses neither."""
    momentum = getattr(m, "momentum", 0.1)
    return momentum is None or momentum >= 1.0


def _tensors(out: Any, depth: int = 2) -> list[torch.Tensor]:
    """The tensors of a forward's output: itself, or those in its tuple/list/dict (two levels deep)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if depth and isinstance(out, Mapping):
        out = list(out.values())
    if depth and isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o, depth - 1)]
    return []


def _output_nodes(returned: list[torch.Tensor], hops: int = 4) -> list[Any]:
    """The autograd nodes the returned tensors come from through parameter-free one-input operations
    (``log_softmax(fc(x))``, ``fc(x).squeeze(1)``), back to and including the first node with parameters."""
    nodes = []
    for t in returned:
        node = t.grad_fn
        for _ in range(hops):
            if node is None:
                break
            nodes.append(node)
            inputs = [n for n, _ in node.next_functions if n is not None]
            if len(inputs) != 1 or type(inputs[0]).__name__ == "AccumulateGrad":
                break
            node = inputs[0]
    return nodes


def _names(layers: list[str], most: int = 4) -> str:
    shown = ", ".join(layers[:most])
    return shown + (f" and {len(layers) - most} more" if len(layers) > most else "")


class LiveChecks:
    """The live checks of one watched model.

    Args:
        model: the (unwrapped) module being trained.
        rules: code -> rule instance for the enabled live checks (``BN202``, ``BN306``, ``BN307``).
        clock: returns the model's current step (optimizer steps completed so far).
    """

    def __init__(self, model: nn.Module, rules: Mapping[str, Any], clock: Callable[[], int]):
        self.model, self.rules, self.clock = model, dict(rules), clock
        self.bns = [(n, m) for n, m in model.named_modules() if n and is_batchnorm(m)]
        self.events: dict[tuple[str, str | None], _Event] = {}
        self.call_sites: list[tuple[int, str | None]] = []  # (step, location of the step's first forward)
        self._handles: list[Any] = []
        self._site_step = -1
        self._nbt_versions: dict[str, int] = {}
        self._checked_steps = 0
        self.errors: list[str] = []
        self.output_layers: set[str] = set()  # layers whose output the model returned (its first forwards)

    # -- hooks --
    def attach(self) -> None:
        for name, m in self.bns:
            self._handles.append(m.register_forward_pre_hook(self._bn_hook(name)))
        self._handles.append(self.model.register_forward_pre_hook(self._root_hook))
        self._nbt_versions = self._versions()
        self._find_outputs()

    def _find_outputs(self, forwards: int = 4) -> None:
        """Note the layers whose output tensor the model returns, over its next ``forwards`` calls."""
        seen: dict[str, Any] = {}
        handles: list[Any] = []
        left = [forwards]

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    seen[name] = out
            return hook

        def done(module: nn.Module, args: Any, out: Any) -> None:
            try:
                returned = _tensors(out)
                ends = _output_nodes(returned)
                self.output_layers.update(n for n, t in seen.items() if any(t is r for r in returned)
                                          or any(t.grad_fn is e for e in ends))
            except Exception as exc:  # noqa: BLE001 - a check must never break the user's training
                self._error(exc)
            seen.clear()
            left[0] -= 1
            if left[0] <= 0:
                for h in handles:
                    h.remove()

        handles += [m.register_forward_hook(keep(n)) for n, m in self.model.named_modules() if n]
        handles.append(self.model.register_forward_hook(done))
        self._handles += handles

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def _root_hook(self, module: nn.Module, args: Any) -> None:
        step = self.clock()
        if step != self._site_step:  # once per step: where the model was called (BN209's location)
            self._site_step = step
            loc = user_location(2)
            if not self.call_sites or self.call_sites[-1][1] != loc:
                self.call_sites.append((step, loc))

    def _bn_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            if not module.training:
                return
            try:
                if "BN306" in self.rules and not torch.is_grad_enabled() \
                        and getattr(module, "running_mean", None) is not None and not _recalibrating(module):
                    self._event("BN306", name, inference=torch.is_inference_mode_enabled())
                x = args[0] if args else None
                if "BN202" in self.rules and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1]:
                    values = x.numel() // x.shape[1]
                    if values < self.rules["BN202"].config["min_values"]:
                        ev = self._event("BN202", name)
                        ev.extra["values_per_channel"] = min(values, ev.extra.get("values_per_channel", values))
                        ev.extra.setdefault("batch", int(x.shape[0]))
            except Exception as exc:  # noqa: BLE001 - a check must never break the user's training
                self._error(exc)
        return hook

    def _event(self, code: str, layer: str | None, *, location: str | None = None, **extra: Any) -> _Event:
        step = self.clock()
        loc = location if location is not None else user_location(2)
        key = (code, loc)
        ev = self.events.get(key)
        if ev is None:
            ev = self.events[key] = _Event(first_step=step, location=loc, extra=dict(extra))
        ev.add(step, layer)
        return ev

    def _error(self, exc: Exception) -> None:
        if len(self.errors) < 3:
            self.errors.append(f"a live check failed ({type(exc).__name__}: {exc}); the script ran on")

    def _versions(self) -> dict[str, int]:
        out = {}
        for name, m in self.bns:
            nbt = getattr(m, "num_batches_tracked", None)
            if isinstance(nbt, torch.Tensor):
                out[name] = nbt._version  # in-place counter: read without a device sync
        return out

    # -- optimizer steps --
    def before_step(self) -> None:
        """BN307 at an optimizer step of the model: trainable BatchNorm layers in eval mode whose counter
        did not move since the previous step."""
        if "BN307" not in self.rules:
            return
        try:
            versions = self._versions()
            model_trains = any(p.requires_grad for p in self.model.parameters())
            # a model in train mode with BatchNorm layers set to eval one by one keeps them there on purpose
            stalled = [] if self.model.training else [
                name for name, m in self.bns if not m.training and _trainable(m, model_trains)
                and versions.get(name, -1) == self._nbt_versions.get(name, -2)]
            self._nbt_versions = versions
            self._checked_steps += 1
            if stalled:
                key = ("BN307", None)
                loc = self.events[key].location if key in self.events else user_location(2)
                ev = self._event("BN307", None, location=loc or "")
                for name in stalled:
                    ev.layers.setdefault(name)
        except Exception as exc:  # noqa: BLE001
            self._error(exc)

    def location_at(self, step: int) -> str | None:
        """Where the model's first forward of ``step`` (or the latest step before it) was called."""
        loc = None
        for s, where in self.call_sites:
            if s > step:
                break
            loc = where
        return loc

    # -- findings --
    def findings(self) -> list[Finding]:
        out = []
        for (code, _), ev in self.events.items():
            if code == "BN307" and len(ev.steps) < self.rules[code].config["min_steps"]:
                continue
            if code == "BN306" and self._every_step(ev):
                continue
            make = {"BN306": self._bn306, "BN307": self._bn307, "BN202": self._bn202}[code]
            f = make(self.rules[code], ev)
            out.append(replace(f, step=ev.first_step, location=ev.location or None))
        return out

    def _every_step(self, ev: _Event) -> bool:
        """A no-grad train-mode forward from one line in at least half of four or more steps: the recipe."""
        steps = self.clock()
        return steps >= 4 and 2 * len(ev.steps) >= steps

    @staticmethod
    def _common(ev: _Event) -> dict[str, Any]:
        return {"layers": list(ev.layers), "first_step": ev.first_step, "last_step": ev.last_step,
                "steps": len(ev.steps), "calls": ev.count, "at_steps": sorted(ev.steps)[:50]}

    def _bn306(self, rule: Any, ev: _Event) -> Finding:
        layers = list(ev.layers)
        how = "torch.inference_mode()" if ev.extra.get("inference") else "torch.no_grad()"
        return rule.finding(
            layers[0] if len(layers) == 1 else None,
            f"a forward under {how} ran {len(layers)} BatchNorm layer(s) in train mode ({_names(layers)}) "
            f"at step {ev.first_step} ({len(ev.steps)} step(s), through step {ev.last_step}): an evaluation pass "
            "without model.eval() updates the running statistics with evaluation data",
            {**self._common(ev), "inference_mode": bool(ev.extra.get("inference"))},
            fix="call model.eval() before the evaluation loop and model.train() after it",
        )

    def _bn307(self, rule: Any, ev: _Event) -> Finding:
        layers = list(ev.layers)
        who = f"BatchNorm {layers[0]}" if len(layers) == 1 else f"{len(layers)} BatchNorm layers ({_names(layers)})"
        return rule.finding(
            layers[0] if len(layers) == 1 else None,
            f"{who} stayed in eval mode for {len(ev.steps)} of {self._checked_steps} optimizer steps from step "
            f"{ev.first_step} to {ev.last_step} while the model trained: its running statistics stalled",
            {**self._common(ev), "eval_steps": len(ev.steps), "trained_steps": self._checked_steps,
             "min_steps": rule.config["min_steps"]},
            fix=f"call model.train() after every validation pass (the model was left in eval mode from step "
            f"{ev.first_step}); to keep only the BatchNorm layers in eval mode, call .eval() on them after "
            "model.train()",
        )

    def _bn202(self, rule: Any, ev: _Event) -> Finding:
        layers = list(ev.layers)
        values = int(ev.extra.get("values_per_channel", 0))
        batch = ev.extra.get("batch")
        severe = values < 2
        tail = ("training fails with 'Expected more than 1 value per channel when training'" if severe
                else "its batch statistics are very noisy")
        return rule.finding(
            layers[0] if len(layers) == 1 else None,
            f"a batch of {batch} sample(s) at step {ev.first_step} gave {_names(layers)} only {values} value(s) per "
            f"channel (< {rule.config['min_values']}; {len(ev.steps)} step(s)): {tail}",
            {**self._common(ev), "values_per_channel": values, "batch": batch,
             "min_values": rule.config["min_values"]},
            severity="error" if severe else None,
        )
