"""train-compare under torch.distributed: every run trained by ``nproc`` processes with DistributedDataParallel.

``run_distributed`` launches the ranks with torch's own launcher (``torch.multiprocessing.start_processes``):
``fork`` on the CPU where the platform has it (the ranks inherit the prepared runs, so models from the user's
files need no pickling), ``spawn`` for CUDA (a forked child cannot use CUDA) and elsewhere. The ranks join one
process group (gloo on the CPU, NCCL on CUDA with one GPU per rank) through a file store in a private temporary
folder (no port to race for), and run every planned run in the same order.

In each run the batch size is per device: the seed's batch order is drawn for the global batch (``nproc`` ×
batch) exactly as one process would draw it, and rank r trains on the r-th slice of every global batch. The
model is wrapped in DDP (identical initial weights: every rank copies the same init, and DDP broadcasts rank
0's at construction), so gradients are averaged over the global batch; the loss is all-reduced every step, so
the loss curve, the divergence checks and steps-to-target describe the global batch and every rank takes the
same decisions. Rank 0 validates, logs gradient norms and the optional ICS (on its own shard), and sends
progress to the parent; the recorded activations are reduced across ranks exactly (``reduce_history``), and
BatchNorm running statistics are gathered from every rank at the end of a run (BN402's evidence) and their
spread reported in the run's notes.

A variant holding SyncBatchNorm is first tried on one shard: torch 2.13 refuses SyncBatchNorm on the CPU
(DistributedDataParallel raises "SyncBatchNorm layers only work with GPU modules" and the layer's own forward
"SyncBatchNorm expected input tensor to be on GPU"), so on gloo/CPU that variant is reported unavailable with
torch's reason instead of crashing the comparison. A rank that fails writes its error to the run folder and
exits; the launcher stops the other ranks and the parent re-raises the error with its original type."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import multiprocessing
import os
import pickle
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit.errors import BnauditError, UsageError
from bnaudit.training.run import Progress, run_one

STORE_TIMEOUT = timedelta(minutes=10)  # a rank stuck longer than this in a collective is stopped by torch
# BN running statistics that differ across ranks by more than this (in running-std units) are reported.
BUFFER_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Plan:
    """How the ranks are launched (decided in the parent, see :func:`plan_launch`)."""

    nproc: int
    backend: str
    start_method: str
    device_type: str


def plan_launch(nproc: int, device: torch.device, workers: int) -> Plan:
    """Check that ``nproc`` processes can train on ``device`` and choose the backend and start method.

    Args:
        nproc: processes (ranks); at least 2 here.
        device: the device asked for (``cpu`` or ``cuda``).
        workers: the parallel-runs option, which cannot be combined with ranks.

    Returns:
        The launch plan.

    Raises:
        UsageError: torch.distributed or the backend is missing, this process is already in a process group,
            not enough GPUs, an unsupported device, or ``workers > 1``.
    """
    import torch.distributed as dist

    if workers > 1:
        raise UsageError("--workers and --nproc cannot be combined: with --nproc every run uses all the processes")
    if not dist.is_available():
        raise UsageError("--nproc needs torch.distributed, which this torch build lacks; use --nproc 1")
    if dist.is_initialized():
        raise UsageError(
            "nproc > 1 starts its own process group, but this process is already in one; call train_compare "
            "outside torch.distributed or with nproc=1"
        )
    if device.type == "cpu":
        if not dist.is_gloo_available():
            raise UsageError("--nproc on the CPU needs the gloo backend, which this torch build lacks; use --nproc 1")
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        return Plan(nproc, "gloo", method, "cpu")
    if device.type == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < nproc:
            raise UsageError(
                f"--nproc {nproc} with --device cuda needs {nproc} GPUs (one per process); found {have}. "
                f"Use --nproc {max(1, have)} or --device cpu"
            )
        backend = "nccl" if dist.is_nccl_available() else "gloo"
        return Plan(nproc, backend, "spawn", "cuda")
    raise UsageError(f"--nproc supports --device cpu (gloo) and cuda (NCCL), not {device.type}")


# -- inside a rank -------------------------------------------------------------------------------------------------


@dataclass
class RankContext:
    """What ``run.run_one`` needs to train one run as one rank of the group.

    Attributes:
        rank, world: this process and the group size.
        device: this rank's device.
        buffer_sync: DDP's buffer mode, read from the last wrapper (None before the first).
    """

    rank: int
    world: int
    device: torch.device
    buffer_sync: bool | None = None  # whether DDP broadcasts rank 0's buffers before every forward

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The DDP wrapper every forward/backward of the run goes through (gradients averaged over ranks)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        sync = getattr(ddp, "forward_sync_buffers", None)
        self.buffer_sync = bool(getattr(ddp, "broadcast_buffers", True) if sync is None else sync)
        return ddp

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch of ``world`` × per-device examples."""
        per = len(index) // self.world
        return index[self.rank * per : (self.rank + 1) * per]

    def global_loss(self, loss: torch.Tensor) -> float:
        """The mean loss over the global batch (shards are equal, so the mean of the ranks' means)."""
        import torch.distributed as dist

        value = loss.detach().clone().reshape(1).to(torch.float64 if self.device.type == "cpu" else torch.float32)
        dist.all_reduce(value)
        return float(value) / self.world

    def finish(self, model: nn.Module, recorder: Any, diverged: bool) -> list[str]:
        """End-of-run collectives (every rank): reduce the recorded activations across ranks and gather the
        BatchNorm running statistics. Returns the notes for rank 0's result (empty on other ranks)."""
        if recorder is not None:
            recorder.reduce_across_ranks()
        from bnaudit.distributed import gather_bn_buffers

        if not any(True for _ in _tracked_bns(model)):
            return []
        buffers = gather_bn_buffers(model)
        if not self.is_main or diverged:
            return []
        return buffer_notes(buffers, self.world, self.buffer_sync)


def _tracked_bns(model: nn.Module) -> Any:
    from bnaudit.layers import is_batchnorm

    return (
        m for m in model.modules() if is_batchnorm(m) and isinstance(getattr(m, "running_mean", None), torch.Tensor)
    )


def buffer_notes(buffers: dict[str, Any], world: int, buffer_sync: bool | None = None) -> list[str]:
    """Describe how far the ranks' BatchNorm running statistics ended apart (BN402's measure).

    Args:
        buffers: ``gather_bn_buffers`` output (one row per rank).
        world: ranks.
        buffer_sync: whether DDP broadcast rank 0's buffers before every forward (then the ranks differ by
            the last step's update only).

    Returns:
        One note naming the layer with the largest spread, or none when the ranks agree.
    """
    import numpy as np

    worst: tuple[float, str, str] | None = None
    for name, b in buffers.items():
        std0 = np.sqrt(np.maximum(b.var[0], 0.0) + b.eps)
        with np.errstate(all="ignore"):
            dmean = float(np.nanmax(np.abs(b.mean - b.mean[:1]) / std0)) if b.mean.size else 0.0
            dvar = float(np.nanmax(np.abs(b.var - b.var[:1]) / np.maximum(b.var[:1], b.eps))) if b.var.size else 0.0
        for value, what in ((dmean, "running_mean (in running std)"), (dvar, "running_var (relative)")):
            if math.isfinite(value) and (worst is None or value > worst[0]):
                worst = (value, name, what)
    if worst is None or worst[0] <= BUFFER_TOLERANCE:
        return [f"BatchNorm running statistics agree across the {world} ranks at the end of the run"]
    value, name, what = worst
    why = (
        "DDP broadcasts rank 0's buffers before every forward, so they differ by the last step's update, each "
        "rank's from its own shard"
        if buffer_sync
        else "DDP does not synchronise buffers here, so each rank's drifted with its own shards"
    )
    note = (
        f"BatchNorm running statistics differ across the {world} ranks at the end of the run (BN402): largest "
        f"|Δ {what}| = {value:.3g} in {name}; {why}; a rank-0 checkpoint keeps rank 0's"
    )
    return [note]


def probe_variant(model: nn.Module, ctx: RankContext, sample: torch.Tensor) -> str | None:
    """Try one DDP training forward of a variant that holds SyncBatchNorm on this rank's ``sample`` (a
    collective: every rank calls it). Returns torch's reason when any rank failed, else None."""
    import torch.distributed as dist

    if not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return None
    err: str | None = None
    try:
        trial = copy.deepcopy(model).to(ctx.device).train()
        ctx.wrap(trial)(sample.to(ctx.device))
    except Exception as exc:  # noqa: BLE001 - torch's own refusal is the reason we report
        text = str(exc).strip().splitlines()
        err = f"{type(exc).__name__}: {text[0] if text else ''}"
    flag = torch.tensor([1.0 if err else 0.0], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank must skip the variant if any rank cannot run it
    if float(flag) > 0 and err is None:
        err = "another rank could not run it"
    return err


@dataclass
class _Launch:
    """What every rank receives (held in memory with fork; pickled with spawn)."""

    plan: Plan
    init_method: str
    folder: str
    threads: int
    plans: list[Any]
    setup: Any = None  # run.RunSetup (fork)
    setup_bytes: bytes | None = None  # pickled run.RunSetup (spawn)
    user_files: list[str] = field(default_factory=list)
    queue: Any = None


_LAUNCH: _Launch | None = None  # set before forking; forked ranks read it here


def _rank_entry(rank: int, launch: _Launch | None) -> None:
    """The process entry point (``start_processes`` passes the rank first)."""
    launch = launch if launch is not None else _LAUNCH
    assert launch is not None
    from bnaudit.usercode import child_signals

    child_signals()  # the parent stops its ranks with SIGTERM; Ctrl-C is the parent's to handle
    code = 0
    try:
        _rank_main(rank, launch)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises it
        code = 1
        with contextlib.suppress(Exception):
            Path(launch.folder, f"error{rank}.pkl").write_bytes(
                pickle.dumps((type(exc).__module__, type(exc).__name__, str(exc), traceback.format_exc()))
            )
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a forked rank must not run the parent's atexit handlers, and gloo next to
    # scikit-learn occasionally aborts at exit after the results are written.
    os._exit(code)


def _rank_main(rank: int, launch: _Launch) -> None:
    import torch.distributed as dist

    torch.set_num_threads(launch.threads)
    plan = launch.plan
    if launch.setup_bytes is not None:
        from bnaudit.loading.specs import import_file

        for path in launch.user_files:  # the classes of models loaded from the user's files, before unpickling
            import_file(Path(path), path)
        setup = pickle.loads(launch.setup_bytes)
    else:
        setup = launch.setup
    device = torch.device("cuda", rank) if plan.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    setup = dataclasses.replace(setup, device=device)
    dist.init_process_group(
        plan.backend, init_method=launch.init_method, rank=rank, world_size=plan.nproc, timeout=STORE_TIMEOUT
    )
    try:
        ctx = RankContext(rank, plan.nproc, device)
        unavailable: dict[str, str] = {}
        probed: set[str] = set()
        for p in launch.plans:  # each variant once, on its first run's model and batch size
            if p.variant in probed:
                continue
            probed.add(p.variant)
            sample = setup.train.inputs[rank * p.batch_size : (rank + 1) * p.batch_size]
            reason = probe_variant(setup.inits[(p.seed, p.variant)], ctx, sample)
            if reason is not None:
                unavailable[p.variant] = reason
        plans = [p for p in launch.plans if p.variant not in unavailable]
        plans = [dataclasses.replace(p, index=i) for i, p in enumerate(plans)]
        send = launch.queue.put if rank == 0 and launch.queue is not None else None
        if send is not None:
            send(Progress("start", 0, len(plans), total_steps=sum(p.steps for p in plans)))
        runs = []
        for p in plans:
            res = run_one(p, setup, send, len(plans), rank_ctx=ctx)
            if rank == 0:
                runs.append(res)
        if rank == 0:
            Path(launch.folder, "results.pkl").write_bytes(pickle.dumps((runs, unavailable)))
        dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# -- in the parent ---------------------------------------------------------------------------------------------------


def _user_files() -> list[str]:
    """Files the loader imported (``bnaudit_user_*`` modules): a spawned rank imports them before unpickling."""
    from bnaudit.loading.specs import loaded_files

    return [str(path) for path in loaded_files()]


def _raise_rank_error(folder: Path, exc: BaseException) -> None:
    """Re-raise a rank's failure in the parent, as its own BnauditError type where it was one."""
    import importlib

    paths = sorted(folder.glob("error*.pkl"))
    # The rank that failed first caused the others' errors (a peer closing its connection): report its own,
    # the error written first (the launcher's error_index breaks ties).
    first = getattr(exc, "error_index", None)
    paths.sort(key=lambda p: (p.stat().st_mtime_ns, p.stem != f"error{first}"))
    for path in paths:
        module, name, message, tb = pickle.loads(path.read_bytes())
        cls: Any = None
        with contextlib.suppress(Exception):
            cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, BnauditError):
            try:
                error = cls(message)
            except Exception:  # noqa: BLE001 - a subclass with another constructor: keep the family at least
                error = BnauditError(message)
            raise error from None
        last = tb.strip().splitlines()[-1] if tb.strip() else f"{name}: {message}"
        from bnaudit.distributed import DistributedError

        raise DistributedError(f"rank {path.stem[5:]} failed during train-compare --nproc: {last}") from None
    from bnaudit.distributed import DistributedError

    raise DistributedError(f"a train-compare rank stopped without a result: {exc}") from None


def run_distributed(
    plans: list[Any], setup: Any, launch_plan: Plan, *, threads: int, progress: Any
) -> tuple[list[Any], dict[str, str]]:
    """Run every plan with ``launch_plan.nproc`` DDP ranks and return rank 0's results.

    Args:
        plans: ``run.RunPlan`` list, in run order.
        setup: ``run.RunSetup`` (inits on the CPU for spawn).
        launch_plan: from :func:`plan_launch`.
        threads: intra-op threads per rank.
        progress: the caller's progress callback (fed from rank 0 through a queue), or None.

    Returns:
        ``(runs, unavailable)``: rank 0's RunResults in plan order, and variant -> reason for variants that
        could not train here.

    Raises:
        The failing rank's BnauditError (same type), DistributedError for other failures, UsageError when a
        spawned launch cannot pickle the model or loss.
    """
    import torch.multiprocessing as tmp

    global _LAUNCH
    with tempfile.TemporaryDirectory(prefix="bnaudit-ddp-") as folder:
        mpctx = multiprocessing.get_context(launch_plan.start_method)
        queue = mpctx.SimpleQueue() if progress is not None else None
        launch = _Launch(launch_plan, f"file://{Path(folder, 'store')}", folder, threads, list(plans), queue=queue)
        if launch_plan.start_method == "fork":
            launch.setup = setup
            _LAUNCH, args = launch, (None,)
        else:
            cpu_setup = dataclasses.replace(
                setup, inits={k: copy.deepcopy(m).cpu() for k, m in setup.inits.items()}, device=torch.device("cpu")
            )
            try:
                launch.setup_bytes = pickle.dumps(cpu_setup)
            except Exception as exc:  # noqa: BLE001 - anything pickle refuses (lambdas, local classes)
                raise UsageError(
                    f"--nproc starts its processes with spawn here, which needs a picklable model and loss: {exc}"
                ) from None
            launch.user_files = _user_files()
            args = (launch,)
        failure: BaseException | None = None

        def drain() -> None:
            while queue is not None and not queue.empty():
                event = queue.get()
                if progress is not None:
                    progress(event)

        ctx = None
        try:
            ctx = tmp.start_processes(
                _rank_entry, args=args, nprocs=launch_plan.nproc, join=False, start_method=launch_plan.start_method
            )
            while True:
                try:
                    finished = ctx.join(timeout=0.1)
                except Exception as exc:  # noqa: BLE001 - ProcessExitedException / ProcessRaisedException
                    failure = exc
                    break
                drain()
                if finished:
                    break
            drain()
        finally:
            _LAUNCH = None
            if ctx is not None:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
        if failure is not None:
            _raise_rank_error(Path(folder), failure)
        out = Path(folder, "results.pkl")
        if not out.exists():
            _raise_rank_error(Path(folder), RuntimeError("rank 0 wrote no results"))
        runs, unavailable = pickle.loads(out.read_bytes())
    return runs, unavailable
