"""The comparison: variants × learning rates × batch sizes × seeds, each a short training run (``run``).

Fairness rules, all enforced here: within a seed every variant starts from the same base weights (see
``variants``) and sees identical batches in identical order (the order depends on the seed and batch size
only), the validation split is the same for every run, and dropout masks come from the same seeded RNG.
The user's model and the global RNG are never touched: runs train deep copies inside ``fork_rng``.

A diverged run is reported, never raised (see ``run``). Progress goes to an optional callback (the CLI draws
it); nothing here prints.

Distributed: with ``nproc > 1`` every run is trained by that many DDP ranks (see ``ddp``); batch sizes are
then per device, the batch order is drawn for the global batch, and the logged loss is the global-batch loss.

Threads: small models train fastest with one intra-op thread (thread start-up and synchronisation cost more
than the arithmetic; measured on the digits MLPs, where two threads were no faster and were ten times slower
while a live progress display shared the cores), so runs use ``threads`` (default: 1 below 1M parameters,
else min(4, torch's current count)); with ``workers > 1`` independent runs go to forked worker processes of
one thread each. The previous thread count is restored."""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from bnaudit.training.data import TensorData, as_tensor_data, match_dtype, split_validation
from bnaudit.training.losses import LossFn, default_target, resolve_loss
from bnaudit.training.measure import check_ics_layer
from bnaudit.training.results import CompareResult, RunResult, summarize
from bnaudit.training.run import Progress, ProgressFn, RunPlan, RunSetup, progress_event, run_one
from bnaudit.training.variants import ModelArg, base_model, build_variant, check_variants, weight_layers
from bnaudit.training.verdict import verdict

__all__ = ["DEFAULT_LRS", "DEFAULT_STEPS", "OPTIMIZERS", "train_compare"]

OPTIMIZERS = ("sgd", "adam")
DEFAULT_LRS = {"sgd": (0.01, 0.1, 1.0), "adam": (0.001, 0.01, 0.1)}
DEFAULT_STEPS = 300


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



_WORKER_SETUP: RunSetup | None = None  # set before forking; children read it instead of unpickling models


def _worker_init() -> None:
    from bnaudit.usercode import child_signals

    child_signals()


def _worker(plan: RunPlan) -> RunResult:
    torch.set_num_threads(1)
    assert _WORKER_SETUP is not None
    return run_one(plan, _WORKER_SETUP, None, 0)


def _run_all(plans: list[RunPlan], setup: RunSetup, progress: ProgressFn | None, workers: int) -> Iterator[RunResult]:
    total = len(plans)
    if workers <= 1 or total <= 1:
        for plan in plans:
            yield run_one(plan, setup, progress, total)
        return
    global _WORKER_SETUP
    _WORKER_SETUP = setup
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(workers, total), initializer=_worker_init) as pool:
            # imap keeps the plans' order, so each result is matched to its plan for the progress event.
            for plan, res in zip(plans, pool.imap(_worker, plans)):
                if progress is not None:
                    progress(progress_event("done", plan, total, res.steps_run, None, res))
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
    args = _Args(**locals())  # the arguments by name, for the steps below (nothing else is defined yet)
    grid = _check_options(args)
    training = _training_data(args, grid)
    step_counts = {bs: _steps_for(bs, args, len(training.train)) for bs in grid.batch_sizes}
    sweep = _sweep(args, grid, training, step_counts)
    return _result(args, grid, training, step_counts, sweep)


@dataclass(frozen=True)
class _Args:
    """``train_compare``'s arguments, as given."""

    model: ModelArg
    data: Any
    variants: Sequence[str]
    lrs: float | Sequence[float] | None
    batch_sizes: int | Sequence[int]
    seeds: int | Sequence[int]
    steps: int | None
    epochs: float | None
    optimizer: str
    momentum: float
    weight_decay: float
    loss: str | LossFn
    val_data: Any
    val_fraction: float
    split_seed: int
    target_loss: float | str | None
    eval_every: int | None
    log_every: int | None
    explode: float
    window: int
    reinit: bool
    user_model: ModelArg | None
    record: bool
    unit_layer: str | None
    unit: int
    ics_layer: str | None
    device: str | torch.device
    threads: int | None
    workers: int
    nproc: int
    progress: ProgressFn | None


@dataclass(frozen=True)
class _Data:
    """The training and validation data in memory, the loss and the target loss."""

    train: TensorData
    val: TensorData
    split_note: str
    loss_name: str
    loss_fn: LossFn
    target: float | None


@dataclass(frozen=True)
class _Sweep:
    """What the runs gave: the runs, the variants torch refused, the time they took, the threads they used,
    and the initial models (with the data in the models' dtype)."""

    runs: list[RunResult]
    unavailable: dict[str, str]
    elapsed: float
    threads: int
    inits: _Inits


def _training_data(args: _Args, grid: _Grid) -> _Data:
    """Split the data, resolve the loss and target, and refuse a batch larger than the training set."""
    train, val, split_note = _split(args.data, args.val_data, args.val_fraction, args.split_seed)
    loss_name, loss_fn = resolve_loss(args.loss, train.targets)
    target = _target(args.target_loss, loss_name, train)
    small, nproc = min(grid.batch_sizes), args.nproc
    if small * nproc > len(train):
        per = f" ({nproc} processes × per-device batch {small})" if nproc > 1 else ""
        raise DataError(
            f"batch size {small * nproc}{per} is larger than the {len(train)} training examples; use a smaller one"
        )
    return _Data(train, val, split_note, loss_name, loss_fn, target)


def _steps_for(bs: int, args: _Args, examples: int) -> int:
    """Optimizer steps per run at batch size ``bs``: from ``epochs`` when given, else ``steps``."""
    if args.epochs is not None:
        return max(1, round(args.epochs * (examples // (bs * args.nproc))))
    return args.steps if args.steps is not None else DEFAULT_STEPS


def _plans(grid: _Grid, step_counts: dict[int, int]) -> list[RunPlan]:
    """One plan per run, seed-major: every variant of a cell runs next to the others."""
    plans: list[RunPlan] = []
    for seed in grid.seeds:
        for bs in grid.batch_sizes:
            for lr in grid.lrs:
                for v in grid.variants:
                    plans.append(RunPlan(len(plans), seed, v, lr, bs, step_counts[bs]))
    return plans


def _sweep(args: _Args, grid: _Grid, data: _Data, step_counts: dict[int, int]) -> _Sweep:
    """Build every initial model, then train every run (here, in worker processes, or under DDP) with the
    run's thread count; torch's thread count is restored afterwards."""
    old_threads = torch.get_num_threads()
    try:
        inits = _build_inits(
            args.model, data.train, data.val, grid, reinit=args.reinit, user_model=args.user_model,
            loss_name=data.loss_name, record=args.record, unit_layer=args.unit_layer, unit=args.unit,
            ics_layer=args.ics_layer,
        )
        used_threads = args.threads or _default_threads(inits.inits[(grid.seeds[0], grid.variants[0])], old_threads)
        torch.set_num_threads(used_threads)
        setup = RunSetup(
            train=inits.train, val=inits.val, loss_name=data.loss_name, loss_fn=data.loss_fn, target=data.target,
            optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
            eval_every=args.eval_every, log_every=args.log_every, explode=args.explode, window=args.window,
            device=grid.device, record=args.record, unit_layer=args.unit_layer, unit=args.unit,
            ics_layer=args.ics_layer, inits=inits.inits, base_names=inits.base_names,
        )
        plans = _plans(grid, step_counts)
        started = time.perf_counter()
        unavailable: dict[str, str] = {}
        if grid.launch is not None:
            from bnaudit.training.ddp import run_distributed

            runs, unavailable = run_distributed(
                plans, setup, grid.launch, threads=used_threads, progress=args.progress
            )
        else:
            if args.progress is not None:
                args.progress(Progress("start", 0, len(plans), total_steps=sum(p.steps for p in plans)))
            runs = list(_run_all(plans, setup, args.progress, args.workers))
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(old_threads)
    return _Sweep(runs, unavailable, elapsed, used_threads, inits)


def _result(args: _Args, grid: _Grid, data: _Data, step_counts: dict[int, int], sweep: _Sweep) -> CompareResult:
    """The runs in cell order, the per-cell summaries, the settings and the verdict."""
    unavailable, runs = sweep.unavailable, sweep.runs
    notes = [data.split_note, *sweep.inits.notes, *_unavailable_notes(grid, unavailable, args.nproc)]
    ran = [v for v in grid.variants if v not in unavailable]
    if not ran:
        raise UsageError(
            "no variant could train: "
            + "; ".join(f"{v}: {why}" for v, why in unavailable.items())
            + ". Add bn or groupnorm to the variants"
        )
    # Present runs grouped by cell (variant-major within each lr/bs) regardless of execution order.
    order = {
        (v, lr, bs): i
        for i, (bs, lr, v) in enumerate((bs, lr, v) for bs in grid.batch_sizes for lr in grid.lrs for v in ran)
    }
    runs.sort(key=lambda r: (order[(r.variant, r.lr, r.batch_size)], grid.seeds.index(r.seed)))
    cells = summarize(runs)
    settings = {
        **_grid_settings(grid, ran, step_counts),
        "epochs": args.epochs,
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "loss": data.loss_name,
        "target_loss": data.target,
        "target_rule": "mean of the last `window` training losses <= target_loss",
        "window": args.window,
        "explode": args.explode,
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "reinit": args.reinit,
        **_run_settings(grid, sweep.threads, args.workers, args.nproc),
        "record": args.record,
        "ics_layer": args.ics_layer,
        "seconds_total": sweep.elapsed,
        "seconds_per_run": sweep.elapsed / max(1, len(runs)),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    text = verdict(cells, target=data.target, steps=step_counts)
    return CompareResult(settings=settings, runs=runs, cells=cells, verdict=text, notes=notes, unavailable=unavailable)


@dataclass(frozen=True)
class _Grid:
    """The checked sweep: which variants, learning rates, batch sizes and seeds, where, and how launched."""

    variants: list[str]
    lrs: list[float]
    batch_sizes: list[int]
    seeds: list[int]
    device: torch.device
    launch: Any  # ddp.Plan with nproc > 1, else None


def _check_options(args: _Args) -> _Grid:
    """Refuse contradictory or invalid options (UsageError) before anything is loaded or trained."""
    optimizer, steps, epochs, explode, window = args.optimizer, args.steps, args.epochs, args.explode, args.window
    workers, nproc = args.workers, args.nproc
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
    variant_list = check_variants(tuple(args.variants), args.user_model)
    lr_list = _as_list(DEFAULT_LRS[optimizer] if args.lrs is None else args.lrs, "learning rates", float)
    check_numbers(lr_list, args.momentum, args.weight_decay)
    bs_list = _as_list(args.batch_sizes, "batch sizes", int)
    seeds = args.seeds
    seed_list = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise UsageError("seeds must be at least 1")
    dev = torch.device(args.device)
    if workers > 1 and (dev.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods()):
        raise UsageError("workers > 1 needs the CPU device on a platform with fork; use workers=1")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"nproc must be a whole number of processes, at least 1; got {nproc!r}")
    launch = None
    if nproc > 1:
        from bnaudit.training.ddp import plan_launch

        launch = plan_launch(nproc, dev, workers)
        _check_processes(nproc)
    return _Grid(variant_list, lr_list, bs_list, seed_list, dev, launch)


def _split(data: Any, val_data: Any, val_fraction: float, split_seed: int) -> tuple[TensorData, TensorData, str]:
    """The training and validation data in memory, and the note that says where the validation came from."""
    train = as_tensor_data(data)
    check_finite(train, "the training data's")
    if val_data is not None:
        val = as_tensor_data(val_data)
        check_like(val, train)
        check_finite(val, "--val-data's")
        return train, val, f"validation: {len(val)} given examples"
    train, val = split_validation(train, val_fraction, split_seed)
    return train, val, (
        f"validation: {len(val)} examples carved out of the data ({val_fraction:.0%}, split seed {split_seed})"
    )


def _target(target_loss: float | str | None, loss_name: str, train: TensorData) -> float | None:
    if target_loss == "auto":
        return default_target(loss_name, train.targets)
    if target_loss is None:
        return None
    target = float(target_loss)
    if not math.isfinite(target):
        raise UsageError(f"--target-loss {target_loss!r}: give a finite number, auto or none")
    return target


@dataclass
class _Inits:
    """Every (seed, variant)'s initial model, the base model's layer names per seed, and the notes."""

    train: TensorData
    val: TensorData
    inits: dict[tuple[int, str], nn.Module] = field(default_factory=dict)
    base_names: dict[int, tuple[list[str], list[str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _build_inits(
    model: ModelArg, train: TensorData, val: TensorData, grid: _Grid, *, reinit: bool, user_model: Any,
    loss_name: str, record: bool, unit_layer: str | None, unit: int, ics_layer: str | None,
) -> _Inits:
    """Build each seed's base model and every variant of it; the first seed's are checked on a real batch
    (and decide the data's dtype), so a model that cannot train fails here with a clear error."""
    dev = grid.device
    small = min(grid.batch_sizes)
    out = _Inits(train, val)
    example = train.inputs[: min(len(train), max(2, small))].to(dev)
    for seed in grid.seeds:
        base, base_notes = base_model(model, seed, reinit=reinit)
        base = base.to(dev)
        first = seed == grid.seeds[0]
        if first:
            out.notes.extend(base_notes)
            dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
            out.train, out.val = match_dtype(out.train, dtype), match_dtype(out.val, dtype)
            example = out.train.inputs[: min(len(out.train), max(2, small))].to(dev)
            check_model(base, out.train, loss_name, dev)
            if ics_layer is not None:
                check_ics_layer(base, ics_layer)
            if unit_layer is not None and unit_layer not in dict(base.named_modules()):
                raise UsageError(f"no layer named {unit_layer!r} in the model for the percentiles")
            if record:
                check_unit(base, out.train, unit_layer_of(base, unit_layer), unit, dev)
        out.base_names[seed] = (
            [n for n, _ in weight_layers(base)],
            [n for n, m in base.named_modules() if is_activation(m)],
        )
        for v in grid.variants:
            built, vnotes = build_variant(v, base, example=example, seed=seed, reinit=reinit, user_model=user_model)
            out.inits[(seed, v)] = built.to(dev)
            if first:
                out.notes.extend(f"{v}: {n}" for n in vnotes)
                if v != "baseline":
                    check_model(out.inits[(seed, v)], out.train, loss_name, dev, what=f"the {v!r} variant")
                check_batch_norm_batch(out.inits[(seed, v)], v, small)
    return out


def _default_threads(model: nn.Module, current: int) -> int:
    # Measured on the digits MLPs: below ~1M parameters one thread is as fast as two or four (thread start-up
    # and synchronisation cost more than the arithmetic) and does not fight a progress display or parallel
    # workers for cores; larger models get up to four.
    size = sum(p.numel() for p in model.parameters())
    return 1 if size < 1_000_000 else min(4, current)


def _unavailable_notes(grid: _Grid, unavailable: dict[str, str], nproc: int) -> list[str]:
    notes = [
        f"{v}: unavailable with {nproc} processes on {grid.device.type}, not run: torch {torch.__version__} refused "
        f"it ({why})" + ("; SyncBatchNorm needs --device cuda with one GPU per process" if v == "syncbn" else "")
        for v, why in unavailable.items()
    ]
    if grid.launch is None and "syncbn" in grid.variants:
        notes.append(
            "syncbn: with one process SyncBatchNorm has no other rank to synchronise with and normalizes "
            "exactly like BatchNorm; compare it with nproc > 1"
        )
    return notes


def _grid_settings(grid: _Grid, ran: list[str], step_counts: dict[int, int]) -> dict[str, Any]:
    """The sweep's part of ``CompareResult.settings`` (keys in the order the JSON has always had)."""
    return {
        "variants": ran,
        "lrs": grid.lrs,
        "batch_sizes": grid.batch_sizes,
        "seeds": grid.seeds,
        "steps": {str(bs): n for bs, n in step_counts.items()},
    }


def _run_settings(grid: _Grid, threads: int, workers: int, nproc: int) -> dict[str, Any]:
    """Where and how the runs ran: device, threads, processes and the distributed launch."""
    return {
        "device": str(grid.device),
        "threads": threads,
        "workers": workers,
        "nproc": nproc,
        "batch_size_per": "device" if nproc > 1 else "step",
        "global_batch_sizes": [bs * nproc for bs in grid.batch_sizes],
        "distributed": _distributed_settings(grid.launch),
    }


def _distributed_settings(launch: Any) -> dict[str, str] | None:
    if launch is None:
        return None
    return {
        "backend": launch.backend,
        "start_method": launch.start_method,
        "wrapper": "DistributedDataParallel",
        "loss": "all-reduced mean over the ranks (the global-batch loss)",
        "validation": "rank 0, full validation set",
    }


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
