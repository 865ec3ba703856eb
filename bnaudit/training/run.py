"""One training run of the comparison: one variant, learning rate, batch size and seed (``run_one``).

The run trains a deep copy of the variant's initial weights on the batches its seed and batch size decide,
inside ``fork_rng`` (the global RNG is never touched), validates on a hook-free twin, and measures gradient
norms, activation drift and the optional ICS along the way. A run that produces a NaN/Inf loss, or a loss
above ``explode`` times its first loss, is stopped and reported as diverged; it never raises. Progress goes to
an optional callback; nothing here prints.

With a ``ddp.RankContext`` the same function trains the run as one rank of a DistributedDataParallel group
(see ``ddp``); ``compare`` plans the runs and gathers their results."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnaudit.errors import DataError
from bnaudit.layers import is_activation
from bnaudit.training.data import TensorData, batch_order, eval_batches
from bnaudit.training.losses import LossFn, accuracy
from bnaudit.training.measure import ICS, GradNorms
from bnaudit.training.results import RunResult
from bnaudit.training.variants import weight_layers
from bnaudit.usercode import describe


@dataclass(frozen=True)
class Progress:
    """A progress event for the ``progress`` callback.

    Attributes:
        kind: ``start`` (total known), ``run`` (a run began), ``step`` (every few steps), ``done`` (a run
            ended; ``result`` is set).
        run: index of the run (0-based); total_runs: how many runs in all.
        step, total_steps: within the run.
        variant, lr, batch_size, seed: the run's cell.
        loss: the latest training loss (``step`` events).
        result: the finished RunResult (``done`` events).
    """

    kind: str
    run: int
    total_runs: int
    step: int = 0
    total_steps: int = 0
    variant: str = ""
    lr: float = 0.0
    batch_size: int = 0
    seed: int = 0
    loss: float | None = None
    result: RunResult | None = None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class RunPlan:
    """One run to do: which init, which cell."""

    index: int
    seed: int
    variant: str
    lr: float
    batch_size: int
    steps: int


@dataclass
class RunSetup:
    """Everything shared by the runs (held in a module global while forked workers run)."""

    train: TensorData
    val: TensorData
    loss_name: str
    loss_fn: LossFn
    target: float | None
    optimizer: str
    momentum: float
    weight_decay: float
    eval_every: int | None
    log_every: int | None
    explode: float
    window: int
    device: torch.device
    record: bool
    unit_layer: str | None
    unit: int
    ics_layer: str | None
    inits: dict[tuple[int, str], nn.Module]
    base_names: dict[int, tuple[list[str], list[str]]]



def make_optimizer(name: str, params: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def evaluate(
    model: nn.Module, shadow: nn.Module, data: TensorData, setup: RunSetup
) -> tuple[float | None, float | None]:
    """Validation loss and accuracy in eval mode (accuracy None for non-classification losses).

    Runs on ``shadow``, a hook-free copy loaded with the model's current state, so the recorder only ever
    sees training passes and the model's own mode and buffers are not touched.
    """
    shadow.load_state_dict(model.state_dict())
    shadow.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in eval_batches(data):
            x, y = x.to(setup.device), y.to(setup.device)
            out = shadow(x)
            total += float(setup.loss_fn(out, y)) * len(x)
            if setup.loss_name == "cross_entropy":
                correct += accuracy(out, y)
            n += len(x)
    loss = total / n if n else None
    if loss is not None and not math.isfinite(loss):
        loss = None
    acc = correct / n if n and setup.loss_name == "cross_entropy" else None
    return loss, acc


def _by_index(names: list[str], base_names: list[str], wanted: str | None) -> str | None:
    """The variant's name for the base model's layer ``wanted``, pairing layers of a kind by position
    (insert_bn wraps a Linear as ``0.0``; the n-th Linear is still the n-th Linear)."""
    if wanted is None:
        return None
    if wanted in names:
        return wanted
    if wanted in base_names:
        i = base_names.index(wanted)
        if i < len(names):
            return names[i]
    return None



def progress_event(
    kind: str, plan: RunPlan, total_runs: int, step: int, loss: float | None = None, result: RunResult | None = None
) -> Progress:
    """The Progress event of ``plan`` at ``step`` (``result`` only for ``done`` events)."""
    return Progress(
        kind, plan.index, total_runs, step, plan.steps, plan.variant, plan.lr, plan.batch_size, plan.seed, loss,
        result if kind == "done" else None,
    )


@dataclass
class _Measures:
    """What a run measures besides its loss: gradient norms, the optional ICS, the activation recording."""

    grads: GradNorms
    ics: ICS | None
    recorder: Any


def _measures(plan: RunPlan, setup: RunSetup, model: nn.Module, result: RunResult, rank_ctx: Any) -> _Measures:
    """Set up the run's measurements on ``model`` (before training starts)."""
    log_every = setup.log_every or max(1, plan.steps // 50)
    base_wl, base_act = setup.base_names[plan.seed]
    act_names = [n for n, m in model.named_modules() if is_activation(m)]
    unit_layer = _by_index(act_names, base_act, setup.unit_layer or (base_act[-1] if base_act else None))
    ics = None
    if setup.ics_layer is not None:
        ics_name = _by_index([n for n, _ in weight_layers(model)], base_wl, setup.ics_layer)
        if ics_name is not None:
            ics = ICS(ics_name)
    if ics is not None and rank_ctx is not None:
        if not rank_ctx.is_main:
            ics = None  # rank 0 measures it on its own shard
        elif any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            # Its extra training-mode passes would run SyncBatchNorm collectives on rank 0 alone.
            ics = None
            result.notes.append("ICS not measured: the shadow passes cannot run SyncBatchNorm on one rank")
        else:
            result.notes.append(f"ICS measured on rank 0's shard ({plan.batch_size} examples per step)")
    recorder: Any = None
    if setup.record:
        from bnaudit.training.recorder import ActivationRecording

        recorder = ActivationRecording(model, every=log_every, unit_layer=unit_layer, unit=setup.unit)
    return _Measures(GradNorms(model), ics, recorder)


def _diverged(result: RunResult, value: float, first_loss: float | None, step: int, explode: float) -> bool:
    """Record a divergence at ``step`` in ``result`` (a non-finite loss or one above ``explode`` × the first)."""
    if not math.isfinite(value):
        result.losses.append(None)
        result.diverged, result.diverged_at = True, step
        result.divergence = f"loss became {value} at step {step}"
        return True
    result.losses.append(value)
    if first_loss is not None and value > explode * max(first_loss, 1e-12):
        result.diverged, result.diverged_at = True, step
        result.divergence = (
            f"loss exploded to {value:.4g} at step {step} (> {explode:g} × the first loss {first_loss:.4g})"
        )
        return True
    return False


def _finish(result: RunResult, setup: RunSetup, step: int, validated: tuple[float | None, float | None]) -> None:
    """The final validation's verdict: a non-finite validation loss after finite training counts as divergence."""
    vl, va = validated
    if vl is None:  # finite training loss but non-finite validation: the weights blew up on the last step
        result.diverged, result.diverged_at = True, step
        result.divergence = f"validation loss is not finite after step {step}"
    else:
        tail = [v for v in result.losses[-setup.window :] if v is not None]
        result.final_loss = sum(tail) / len(tail) if tail else None
        result.val_loss, result.val_accuracy = vl, va


def run_one(
    plan: RunPlan, setup: RunSetup, progress: ProgressFn | None, total_runs: int, rank_ctx: Any = None
) -> RunResult:
    """Train one variant for one cell and seed; divergence is recorded, never raised.

    With ``rank_ctx`` (a ``ddp.RankContext``) this process is one rank of a DDP group: it trains on its shard
    of each global batch through the DDP wrapper, the logged loss is the all-reduced global-batch loss, and
    only rank 0 validates and measures (its result is the one kept).

    Raises:
        DataError: the user's forward or loss failed mid-run.
    """
    model = copy.deepcopy(setup.inits[(plan.seed, plan.variant)]).to(setup.device)
    shadow = copy.deepcopy(model)  # hook-free twin for evaluation and ICS, made before any hook is added
    model.train()
    main = rank_ctx is None or rank_ctx.is_main
    world = 1 if rank_ctx is None else rank_ctx.world
    trained = model if rank_ctx is None else rank_ctx.wrap(model)  # DDP shares the parameters with ``model``
    result = RunResult(plan.variant, plan.lr, plan.batch_size, plan.seed)
    steps = plan.steps
    eval_every = setup.eval_every or max(1, steps // 10)
    log_every = setup.log_every or max(1, steps // 50)
    opt = make_optimizer(setup.optimizer, model.parameters(), plan.lr, setup.momentum, setup.weight_decay)
    measures = _measures(plan, setup, model, result, rank_ctx)
    ics, recorder = measures.ics, measures.recorder
    started = time.perf_counter()
    smoothed: list[float] = []
    first_loss: float | None = None

    def validate(step: int) -> tuple[float | None, float | None]:
        if not main:
            return 0.0, None  # only rank 0's result is kept; the others skip the evaluation
        vl, va = evaluate(model, shadow, setup.val, setup)
        result.val_steps.append(step)
        result.val_losses.append(vl)
        result.val_accuracies.append(va)
        return vl, va

    if progress is not None:
        progress(progress_event("run", plan, total_runs, 0))
    validate(0)
    tick = max(1, steps // 100)
    step = 0
    with torch.random.fork_rng(devices=[]), recorder if recorder is not None else contextlib.nullcontext():
        # Dropout masks: the same stream for every variant of this seed (and a different one on every rank, so
        # the shards do not share masks; rank 0's is the one-process stream).
        torch.manual_seed(plan.seed + 7919 * (rank_ctx.rank if rank_ctx is not None else 0))
        order = batch_order(len(setup.train), plan.batch_size * world, steps, plan.seed)
        for step, idx in enumerate(order, start=1):
            if rank_ctx is not None:
                idx = rank_ctx.shard(idx)  # the global batch is drawn as one process would; this rank's slice
            x = setup.train.inputs[idx].to(setup.device)
            y = setup.train.targets[idx].to(setup.device)
            log_now = step % log_every == 0 or step == 1
            rng = torch.get_rng_state() if ics is not None and log_now else None
            opt.zero_grad(set_to_none=True)
            try:
                loss = setup.loss_fn(trained(x), y)
            except Exception as exc:  # the user's forward or loss mid-run: a clear error, not a torch traceback
                raise DataError(
                    f"the {plan.variant!r} variant (lr {plan.lr:g}, batch size {plan.batch_size}, seed {plan.seed}) "
                    f"failed at training step {step}: {describe(exc)}"
                ) from exc
            value = float(loss.detach()) if rank_ctx is None else rank_ctx.global_loss(loss)
            if _diverged(result, value, first_loss, step, setup.explode):
                break
            first_loss = value if first_loss is None else first_loss
            smoothed.append(value)
            if setup.target is not None and result.steps_to_target is None:
                tail = smoothed[-setup.window :]
                if len(tail) == min(setup.window, steps) and sum(tail) / len(tail) <= setup.target:
                    result.steps_to_target = step
            loss.backward()
            if log_now and main:
                measures.grads.log(step)
                if ics is not None and rng is not None:
                    ics.measure(step, model, shadow, opt, lambda m, x=x, y=y: setup.loss_fn(m(x), y), rng)
            opt.step()
            if recorder is not None:
                recorder.step()
            if step % eval_every == 0 and step != steps:
                validate(step)
            if step % tick == 0 and progress is not None:
                progress(progress_event("step", plan, total_runs, step, value))
    result.steps_run = step
    if rank_ctx is not None:
        result.notes.extend(rank_ctx.finish(model, recorder, result.diverged))
    if not result.diverged:
        _finish(result, setup, step, validate(step))
    if recorder is not None:
        result.drift, result.percentiles = recorder.results()
    result.grad_norms = measures.grads.to_dict()
    result.ics = ics.to_dict() if ics is not None else None
    result.seconds = time.perf_counter() - started
    if progress is not None:
        progress(progress_event("done", plan, total_runs, step, None, result))
    return result
