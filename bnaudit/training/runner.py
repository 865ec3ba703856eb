"""The comparison runner: variants × learning rates × batch sizes × seeds, each a short training run.

Fairness rules, all enforced here: within a seed every variant starts from the same base weights (see
``variants``) and sees identical batches in identical order (the order depends on the seed and batch size
only), the validation split is the same for every run, and dropout masks come from the same seeded RNG.
The user's model and the global RNG are never touched: runs train deep copies inside ``fork_rng``.

A run that produces a NaN/Inf loss, or a loss above ``explode`` times its first loss, is stopped and
reported as diverged; it never raises. Progress goes to an optional callback (the CLI draws it); nothing
here prints.

Distributed: with ``nproc > 1`` every run is trained by that many DDP ranks (see ``ddp``); batch sizes are
then per device, the batch order is drawn for the global batch, and the logged loss is the global-batch loss.

Threads: small models train fastest with one intra-op thread (thread start-up and synchronisation cost more
than the arithmetic; measured on the digits MLPs, where two threads were no faster and were ten times slower
while a live progress display shared the cores), so runs use ``threads`` (default: 1 below 1M parameters,
else min(4, torch's current count)); with ``workers > 1`` independent runs go to forked worker processes of
one thread each. The previous thread count is restored."""

from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnaudit.errors import DataError, UsageError
from bnaudit.layers import is_activation
from bnaudit.training.checks import (
    check_batch_norm_batch,
    check_finite,
    check_like,
    check_model,
    check_numbers,
    check_unit,
    unit_layer_of,
)
from bnaudit.training.data import TensorData, as_tensor_data, batch_order, eval_batches, match_dtype, split_validation
from bnaudit.training.losses import LossFn, accuracy, default_target, resolve_loss
from bnaudit.training.measure import ICS, GradNorms, check_ics_layer
from bnaudit.training.results import CompareResult, RunResult, summarize
from bnaudit.training.variants import ModelArg, base_model, build_variant, check_variants, weight_layers
from bnaudit.training.verdict import verdict
from bnaudit.usercode import describe

OPTIMIZERS = ("sgd", "adam")
DEFAULT_LRS = {"sgd": (0.01, 0.1, 1.0), "adam": (0.001, 0.01, 0.1)}
DEFAULT_STEPS = 300


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
class _Plan:
    """One run to do: which init, which cell."""

    index: int
    seed: int
    variant: str
    lr: float
    batch_size: int
    steps: int


@dataclass
class _Setup:
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


def _as_list(value: Any, name: str, kind: type) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UsageError(f"{name} is empty; give at least one value")
    try:
        out = [kind(v) for v in items]
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be {kind.__name__} values, got {items!r}") from None
    if any(v <= 0 for v in out):
        raise UsageError(f"{name} must be positive, got {items!r}")
    return list(dict.fromkeys(out))


def _make_optimizer(name: str, params: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _evaluate(
    model: nn.Module, shadow: nn.Module, data: TensorData, setup: _Setup
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


def _run(plan: _Plan, setup: _Setup, progress: ProgressFn | None, total_runs: int, rank_ctx: Any = None) -> RunResult:
    """Train one variant for one cell and seed; divergence is recorded, never raised.

    With ``rank_ctx`` (a ``ddp.RankContext``) this process is one rank of a DDP group: it trains on its shard
    of each global batch through the DDP wrapper, the logged loss is the all-reduced global-batch loss, and
    only rank 0 validates and measures (its result is the one kept).
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
    opt = _make_optimizer(setup.optimizer, model.parameters(), plan.lr, setup.momentum, setup.weight_decay)
    grads = GradNorms(model)
    base_wl, base_act = setup.base_names[plan.seed]
    act_names = [n for n, m in model.named_modules() if _is_act(m)]
    unit_layer = _by_index(act_names, base_act, setup.unit_layer or (base_act[-1] if base_act else None))
    ics = None
    if setup.ics_layer is not None:
        ics_name = _by_index([n for n, _ in weight_layers(model)], base_wl, setup.ics_layer)
        if ics_name is not None:
            ics = ICS(ics_name)
    if ics is not None and rank_ctx is not None:
        if not main:
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
    started = time.perf_counter()
    smoothed: list[float] = []
    first_loss: float | None = None

    def emit(kind: str, step: int, loss: float | None = None) -> None:
        if progress is not None:
            progress(
                Progress(
                    kind,
                    plan.index,
                    total_runs,
                    step,
                    steps,
                    plan.variant,
                    plan.lr,
                    plan.batch_size,
                    plan.seed,
                    loss,
                    result if kind == "done" else None,
                )
            )

    def validate(step: int) -> tuple[float | None, float | None]:
        if not main:
            return 0.0, None  # only rank 0's result is kept; the others skip the evaluation
        vl, va = _evaluate(model, shadow, setup.val, setup)
        result.val_steps.append(step)
        result.val_losses.append(vl)
        result.val_accuracies.append(va)
        return vl, va

    emit("run", 0)
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
            if not math.isfinite(value):
                result.losses.append(None)
                result.diverged, result.diverged_at = True, step
                result.divergence = f"loss became {value} at step {step}"
                break
            result.losses.append(value)
            if first_loss is None:
                first_loss = value
            elif value > setup.explode * max(first_loss, 1e-12):
                result.diverged, result.diverged_at = True, step
                result.divergence = (
                    f"loss exploded to {value:.4g} at step {step} "
                    f"(> {setup.explode:g} × the first loss {first_loss:.4g})"
                )
                break
            smoothed.append(value)
            if setup.target is not None and result.steps_to_target is None:
                tail = smoothed[-setup.window :]
                if len(tail) == min(setup.window, steps) and sum(tail) / len(tail) <= setup.target:
                    result.steps_to_target = step
            loss.backward()
            if log_now and main:
                grads.log(step)
                if ics is not None and rng is not None:
                    ics.measure(step, model, shadow, opt, lambda m, x=x, y=y: setup.loss_fn(m(x), y), rng)
            opt.step()
            if recorder is not None:
                recorder.step()
            if step % eval_every == 0 and step != steps:
                validate(step)
            if step % tick == 0:
                emit("step", step, value)
    result.steps_run = step
    if rank_ctx is not None:
        result.notes.extend(rank_ctx.finish(model, recorder, result.diverged))
    if not result.diverged:
        vl, va = validate(step)
        if vl is None:  # finite training loss but non-finite validation: the weights blew up on the last step
            result.diverged, result.diverged_at = True, step
            result.divergence = f"validation loss is not finite after step {step}"
        else:
            tail = [v for v in result.losses[-setup.window :] if v is not None]
            result.final_loss = sum(tail) / len(tail) if tail else None
            result.val_loss, result.val_accuracy = vl, va
    if recorder is not None:
        result.drift, result.percentiles = recorder.results()
    result.grad_norms = grads.to_dict()
    result.ics = ics.to_dict() if ics is not None else None
    result.seconds = time.perf_counter() - started
    emit("done", step)
    return result


def _is_act(m: nn.Module) -> bool:
    return is_activation(m)


_WORKER_SETUP: _Setup | None = None  # set before forking; children read it instead of unpickling models


def _worker_init() -> None:
    from bnaudit.usercode import child_signals

    child_signals()


def _worker(plan: _Plan) -> RunResult:
    torch.set_num_threads(1)
    assert _WORKER_SETUP is not None
    return _run(plan, _WORKER_SETUP, None, 0)


def _run_all(plans: list[_Plan], setup: _Setup, progress: ProgressFn | None, workers: int) -> Iterator[RunResult]:
    total = len(plans)
    if workers <= 1 or total <= 1:
        for plan in plans:
            yield _run(plan, setup, progress, total)
        return
    global _WORKER_SETUP
    _WORKER_SETUP = setup
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(workers, total), initializer=_worker_init) as pool:
            # imap keeps the plans' order, so each result is matched to its plan for the progress event.
            for plan, res in zip(plans, pool.imap(_worker, plans)):
                if progress is not None:
                    progress(
                        Progress(
                            "done",
                            plan.index,
                            total,
                            res.steps_run,
                            plan.steps,
                            plan.variant,
                            plan.lr,
                            plan.batch_size,
                            plan.seed,
                            None,
                            res,
                        )
                    )
                yield res
    finally:
        _WORKER_SETUP = None


def train_compare(
    model: ModelArg,
    data: Any,
    *,
    variants: Sequence[str] = ("baseline", "bn"),
    lrs: float | Sequence[float] | None = None,
    batch_sizes: int | Sequence[int] = (64,),
    seeds: int | Sequence[int] = 3,
    steps: int | None = None,
    epochs: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss: str | LossFn = "auto",
    val_data: Any = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    target_loss: float | str | None = "auto",
    eval_every: int | None = None,
    log_every: int | None = None,
    explode: float = 10.0,
    window: int = 10,
    reinit: bool = True,
    user_model: ModelArg | None = None,
    record: bool = True,
    unit_layer: str | None = None,
    unit: int = 0,
    ics_layer: str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    workers: int = 1,
    nproc: int = 1,
    progress: ProgressFn | None = None,
) -> CompareResult:
    """Train the model with and without normalization under identical conditions and compare.

    Args:
        model: an nn.Module (re-initialised from each seed unless ``reinit=False``) or a zero-argument
            factory (called under each seed).
        data: training data: an ``(inputs, targets)`` pair, a Dataset, a DataLoader/iterable of batches, or a
            bnaudit DataSource. Held in memory.
        variants: any of ``baseline`` (the model as given), ``bn`` (``bnaudit.insert_bn``), ``syncbn`` (``bn``
            with SyncBatchNorm, for ``nproc > 1``), ``groupnorm`` / ``layernorm`` (``bnaudit.swap_norm``),
            ``user`` (``user_model``).
        lrs: learning rates (default sgd: 0.01, 0.1, 1.0; adam: 0.001, 0.01, 0.1).
        batch_sizes: batch sizes to sweep; with ``nproc > 1`` they are per device (per process): each step
            trains on a global batch of ``nproc`` × batch size.
        seeds: how many seeds (0..n-1) or the seeds themselves.
        steps: optimizer steps per run (default 300); ``epochs`` instead sets steps per batch size.
        optimizer: ``sgd`` (with ``momentum``) or ``adam``; ``weight_decay`` for both.
        loss: ``auto`` (cross-entropy for integer targets, MSE otherwise), ``cross_entropy``, ``mse`` or a
            callable ``fn(outputs, targets)``.
        val_data: validation data (same forms as ``data``); when None, ``val_fraction`` of ``data`` is carved
            out with ``split_seed``.
        target_loss: training loss to reach for steps-to-target: a number, ``auto`` (a quarter of the best
            constant predictor's loss) or None. A run reaches it when the mean of its last ``window`` losses
            is at or below it.
        eval_every: validation interval in steps (default steps/10); ``log_every``: gradient-norm,
            percentile, drift and ICS interval (default steps/50).
        explode: a loss above ``explode`` × the run's first loss counts as divergence.
        reinit: re-draw the module's parameters from each seed (False: every seed starts from the given
            weights; seeds then vary the batch order only).
        user_model: the user's changed model for the ``user`` variant.
        record: measure per-layer activation drift with ``bnaudit.record``.
        unit_layer, unit: the module whose input's channel ``unit`` is followed for the Fig. 1 percentiles
            (default: the last activation, unit 0).
        ics_layer: a Linear/Conv layer of the base model for the optional Santurkar et al. gradient ICS.
        device: where to train.
        threads: intra-op threads during the runs (default: 1 for models under 1M parameters, else
            min(4, current)); restored afterwards.
        workers: parallel worker processes for independent runs (CPU, fork platforms only).
        nproc: train every run under torch.distributed with this many processes (DDP; gloo on the CPU, NCCL
            with one GPU per process on CUDA), launched by ``torch.multiprocessing.start_processes``. Each rank
            trains on its slice of every global batch; the logged loss is the global-batch loss (all-reduced).
            A variant torch cannot train here (SyncBatchNorm on the CPU) is listed in ``unavailable`` with
            the reason. 1 (default): one process, no process group.
        progress: callback receiving :class:`Progress` events.

    Returns:
        The CompareResult: settings, every run, per-cell summaries and the verdict.

    Raises:
        UsageError: contradictory or invalid options. DataError: unusable data. SpecError: a bad model
        factory. TransformError: a variant's transform failed.
    """
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if steps is not None and epochs is not None:
        raise UsageError("give steps or epochs, not both")
    if steps is not None and steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise UsageError(f"epochs must be a positive finite number, got {epochs}")
    if explode <= 1:
        raise UsageError(f"explode must be above 1 (a multiple of the first loss), got {explode}")
    if window < 1:
        raise UsageError(f"window must be at least 1, got {window}")
    variant_list = check_variants(tuple(variants), user_model)
    lr_list = _as_list(DEFAULT_LRS[optimizer] if lrs is None else lrs, "learning rates", float)
    check_numbers(lr_list, momentum, weight_decay)
    bs_list = _as_list(batch_sizes, "batch sizes", int)
    seed_list = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise UsageError("seeds must be at least 1")
    dev = torch.device(device)
    if workers > 1 and (dev.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods()):
        raise UsageError("workers > 1 needs the CPU device on a platform with fork; use workers=1")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"nproc must be a whole number of processes, at least 1; got {nproc!r}")
    launch = None
    if nproc > 1:
        from bnaudit.training.ddp import plan_launch

        launch = plan_launch(nproc, dev, workers)
        _check_processes(nproc)

    train = as_tensor_data(data)
    check_finite(train, "the training data's")
    if val_data is not None:
        val = as_tensor_data(val_data)
        check_like(val, train)
        check_finite(val, "--val-data's")
        split_note = f"validation: {len(val)} given examples"
    else:
        train, val = split_validation(train, val_fraction, split_seed)
        split_note = (
            f"validation: {len(val)} examples carved out of the data ({val_fraction:.0%}, split seed {split_seed})"
        )
    loss_name, loss_fn = resolve_loss(loss, train.targets)
    if target_loss == "auto":
        target = default_target(loss_name, train.targets)
    elif target_loss is None:
        target = None
    else:
        target = float(target_loss)
        if not math.isfinite(target):
            raise UsageError(f"--target-loss {target_loss!r}: give a finite number, auto or none")
    small = min(bs_list)
    if small * nproc > len(train):
        per = f" ({nproc} processes × per-device batch {small})" if nproc > 1 else ""
        raise DataError(
            f"batch size {small * nproc}{per} is larger than the {len(train)} training examples; use a smaller one"
        )

    def steps_for(bs: int) -> int:
        if epochs is not None:
            return max(1, round(epochs * (len(train) // (bs * nproc))))
        return steps if steps is not None else DEFAULT_STEPS

    notes = [split_note]
    inits: dict[tuple[int, str], nn.Module] = {}
    base_names: dict[int, tuple[list[str], list[str]]] = {}
    example = train.inputs[: min(len(train), max(2, min(bs_list)))].to(dev)
    old_threads = torch.get_num_threads()
    used_threads = threads or old_threads
    try:
        for seed in seed_list:
            base, base_notes = base_model(model, seed, reinit=reinit)
            base = base.to(dev)
            if seed == seed_list[0]:
                notes.extend(base_notes)
                dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
                train, val = match_dtype(train, dtype), match_dtype(val, dtype)
                example = train.inputs[: min(len(train), max(2, min(bs_list)))].to(dev)
                check_model(base, train, loss_name, dev)
                if ics_layer is not None:
                    check_ics_layer(base, ics_layer)
                if unit_layer is not None and unit_layer not in dict(base.named_modules()):
                    raise UsageError(f"no layer named {unit_layer!r} in the model for the percentiles")
                if record:
                    check_unit(base, train, unit_layer_of(base, unit_layer), unit, dev)
            base_names[seed] = (
                [n for n, _ in weight_layers(base)],
                [n for n, m in base.named_modules() if _is_act(m)],
            )
            for v in variant_list:
                built, vnotes = build_variant(v, base, example=example, seed=seed, reinit=reinit, user_model=user_model)
                inits[(seed, v)] = built.to(dev)
                if seed == seed_list[0]:
                    notes.extend(f"{v}: {n}" for n in vnotes)
                    if v != "baseline":
                        check_model(inits[(seed, v)], train, loss_name, dev, what=f"the {v!r} variant")
                    check_batch_norm_batch(inits[(seed, v)], v, small)
        if not threads:
            # Measured on the digits MLPs: below ~1M parameters one thread is as fast as two or four (thread
            # start-up and synchronisation cost more than the arithmetic) and does not fight a progress display
            # or parallel workers for cores; larger models get up to four.
            size = sum(p.numel() for p in inits[(seed_list[0], variant_list[0])].parameters())
            used_threads = 1 if size < 1_000_000 else min(4, old_threads)
        torch.set_num_threads(used_threads)
        setup = _Setup(
            train=train,
            val=val,
            loss_name=loss_name,
            loss_fn=loss_fn,
            target=target,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            eval_every=eval_every,
            log_every=log_every,
            explode=explode,
            window=window,
            device=dev,
            record=record,
            unit_layer=unit_layer,
            unit=unit,
            ics_layer=ics_layer,
            inits=inits,
            base_names=base_names,
        )
        plans = []
        for seed in seed_list:
            for bs in bs_list:
                for lr in lr_list:
                    for v in variant_list:
                        plans.append(_Plan(len(plans), seed, v, lr, bs, steps_for(bs)))
        started = time.perf_counter()
        unavailable: dict[str, str] = {}
        if launch is not None:
            from bnaudit.training.ddp import run_distributed

            runs, unavailable = run_distributed(plans, setup, launch, threads=used_threads, progress=progress)
        else:
            if progress is not None:
                progress(Progress("start", 0, len(plans), total_steps=sum(p.steps for p in plans)))
            runs = list(_run_all(plans, setup, progress, workers))
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(old_threads)
    for v, why in unavailable.items():
        notes.append(
            f"{v}: unavailable with {nproc} processes on {dev.type}, not run: torch {torch.__version__} refused it "
            f"({why})" + ("; SyncBatchNorm needs --device cuda with one GPU per process" if v == "syncbn" else "")
        )
    if launch is None and "syncbn" in variant_list:
        notes.append(
            "syncbn: with one process SyncBatchNorm has no other rank to synchronise with and normalizes "
            "exactly like BatchNorm; compare it with nproc > 1"
        )
    ran = [v for v in variant_list if v not in unavailable]
    if not ran:
        raise UsageError(
            "no variant could train: "
            + "; ".join(f"{v}: {why}" for v, why in unavailable.items())
            + ". Add bn or groupnorm to the variants"
        )
    # Present runs grouped by cell (variant-major within each lr/bs) regardless of execution order.
    order = {
        (v, lr, bs): i for i, (bs, lr, v) in enumerate((bs, lr, v) for bs in bs_list for lr in lr_list for v in ran)
    }
    runs.sort(key=lambda r: (order[(r.variant, r.lr, r.batch_size)], seed_list.index(r.seed)))
    cells = summarize(runs)
    settings = {
        "variants": ran,
        "lrs": lr_list,
        "batch_sizes": bs_list,
        "seeds": seed_list,
        "steps": {str(bs): steps_for(bs) for bs in bs_list},
        "epochs": epochs,
        "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "loss": loss_name,
        "target_loss": target,
        "target_rule": "mean of the last `window` training losses <= target_loss",
        "window": window,
        "explode": explode,
        "train_examples": len(train),
        "val_examples": len(val),
        "reinit": reinit,
        "device": str(dev),
        "threads": used_threads,
        "workers": workers,
        "nproc": nproc,
        "batch_size_per": "device" if nproc > 1 else "step",
        "global_batch_sizes": [bs * nproc for bs in bs_list],
        "distributed": (
            {
                "backend": launch.backend,
                "start_method": launch.start_method,
                "wrapper": "DistributedDataParallel",
                "loss": "all-reduced mean over the ranks (the global-batch loss)",
                "validation": "rank 0, full validation set",
            }
            if launch is not None
            else None
        ),
        "record": record,
        "ics_layer": ics_layer,
        "seconds_total": elapsed,
        "seconds_per_run": elapsed / max(1, len(runs)),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    text = verdict(cells, target=target, steps={bs: steps_for(bs) for bs in bs_list})
    return CompareResult(settings=settings, runs=runs, cells=cells, verdict=text, notes=notes, unavailable=unavailable)


def _check_processes(nproc: int) -> None:
    """Refuse a process count whose memory would pass the limit: every rank holds its own torch, model and
    data, about what this process holds now (measured: 16 gloo ranks took 4.7 GB on a 2-core machine).

    Raises:
        LimitError: ``nproc`` times this process's memory is above ``bnaudit.limits.memory_limit()``.
    """
    import os

    from bnaudit.limits import check_allocation, process_memory

    each = max(process_memory(), 256 << 20)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    check_allocation(
        f"--nproc {nproc} ({nproc} processes of about {each / (1 << 30):.2g} GiB each, on {cores} CPU cores)",
        nproc, (each,), 1, hint=f"use fewer processes (--nproc {max(1, min(cores, nproc - 1))})",
    )
