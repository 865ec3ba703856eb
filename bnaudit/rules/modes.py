"""BN3xx: eval mode and running statistics, each finding backed by an experiment on the audit's copy of the
model (put back after each experiment).

The BatchNorm failures users report most are not architectural: inference run in train mode, test data
leaking into the running statistics, SWA/EMA weights paired with buffers that were never estimated, frozen
backbones whose statistics keep drifting, eval accuracy collapsing while train-mode accuracy looks fine. The
experiments live in ``bnaudit.probes.modes``; the rules here set thresholds, name layers and say what to
change. Each rule's docstring is its documentation (``bnaudit rules BN301``); the ``valid``/``invalid``
examples are small models trained for a fraction of a second on scikit-learn's digits, built the way users
write them."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.errors import DataError
from bnaudit.findings import Finding
from bnaudit.layers import is_batchnorm
from bnaudit.rules.base import Example, Rule, register

# --- example factories: small models trained for a moment on real data, cached and copied ----------------------


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits as (x in [0, 1], labels), the data the example models are trained on."""
    x, y = _digits_tensors()
    return x.clone(), y.clone()


def _shifted_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The same digits as a different camera would give them: brighter and with more contrast."""
    x, y = _digits()
    return x * 2.5 + 0.5, y


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def _train(model: nn.Module, steps: int = 120, *, seed: int = 0) -> nn.Module:
    """A user's training loop: shuffled minibatches of 64, Adam, cross-entropy."""
    x, y = _digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@functools.lru_cache(maxsize=1)
def _trained_mlp_cached() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _train(_mlp())


def _trained_mlp() -> nn.Module:
    """An MLP with BatchNorm trained on digits; left in train mode, as after its training loop."""
    return copy.deepcopy(_trained_mlp_cached())


@functools.lru_cache(maxsize=1)
def _trained_cnn_cached() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
        return _train(model)


def _trained_cnn() -> nn.Module:
    """A CNN with BatchNorm2d trained on the digits as 1x8x8 images, left in train mode after training. In
    train mode a batch of one sample still runs (64 values per channel), so only the comparison of
    co-batches shows that its predictions depend on the batch."""
    return copy.deepcopy(_trained_cnn_cached())


def _ema_update(ema: nn.Module, model: nn.Module, decay: float = 0.9) -> None:
    """A hand-written EMA over ``parameters()`` only, as often seen in training scripts: the buffers of the
    EMA copy are never touched."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)


@functools.lru_cache(maxsize=1)
def _ema_cached() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _mlp()
        ema = copy.deepcopy(model)  # made before training: its buffers are a fresh layer's 0 / 1
        x, y = _digits_tensors()
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(120):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            _ema_update(ema, model)
        return ema


def _ema_params_only() -> nn.Module:
    """EMA weights whose BatchNorm buffers were never estimated (still running_mean=0, running_var=1)."""
    return copy.deepcopy(_ema_cached())


def _ema_with_update_bn() -> nn.Module:
    """The corrected twin: ``torch.optim.swa_utils.update_bn`` run on the training data after averaging."""
    from torch.optim.swa_utils import update_bn
    from torch.utils.data import DataLoader, TensorDataset

    ema = copy.deepcopy(_ema_cached())
    x, _ = _digits_tensors()
    update_bn(DataLoader(TensorDataset(x), batch_size=64), ema)
    return ema


def _untrained_mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _mlp()


def _zero_init_last_mlp() -> nn.Module:
    """A fresh MLP whose last BatchNorm starts at gamma = 0, as torchvision's ``zero_init_residual`` and timm's
    ``zero_init_last`` set the last BatchNorm of each residual branch: weights that differ from 1 by design."""
    model = _untrained_mlp()
    nn.init.zeros_(model[4].weight)
    return model


def _dcgan_init_mlp() -> nn.Module:
    """A fresh MLP initialised as DCGAN-style code does: BatchNorm gamma drawn from N(1, 0.02), beta 0."""
    model = _untrained_mlp()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=gen))
            nn.init.zeros_(m.bias)
    return model


def _untracked_mlp() -> nn.Module:
    """BatchNorm built with ``track_running_stats=False``: batch statistics in eval mode too."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(), nn.Linear(32, 10)
        )
        return _train(model, steps=60)


class _FineTune(nn.Module):
    """A pretrained backbone, frozen, under a new trainable head: the classic fine-tuning set-up."""

    def __init__(self, backbone: nn.Module, keep_frozen_bn_eval: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(32, 10)
        self.keep_frozen_bn_eval = keep_frozen_bn_eval
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FineTune:
        super().train(mode)
        if self.keep_frozen_bn_eval:
            # The fix: frozen BatchNorm layers normalize with their pretrained statistics, always.
            for m in self.backbone.modules():
                if is_batchnorm(m):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _finetune(keep_frozen_bn_eval: bool) -> nn.Module:
    backbone = nn.Sequential(*list(_trained_mlp().children())[:-1])  # drop the old head
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = _FineTune(backbone, keep_frozen_bn_eval)
    return model.train()


def _frozen_backbone() -> nn.Module:
    return _finetune(False)


def _frozen_backbone_kept_eval() -> nn.Module:
    return _finetune(True)


def _deployed() -> nn.Module:
    """An inference-only copy, as a serving script loads one: ``model.requires_grad_(False)`` and
    ``model.eval()`` once, right after loading."""
    model = _trained_mlp()
    model.requires_grad_(False)
    return model.eval()


@functools.lru_cache(maxsize=2)
def _recorded_run(switch_back: bool) -> tuple[nn.Module, Any]:
    """A user's loop recorded with ``bnaudit.record``: 40 steps, with a validation pass after step 15 that
    calls ``model.eval()``; only the corrected loop calls ``model.train()`` afterwards."""
    from bnaudit.recording import record

    x, y = _digits_tensors()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        model.train()
        with record(model, per_channel=False) as rec:
            for step in range(40):
                idx = torch.randint(0, len(x), (64,), generator=gen)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == 15:
                    model.eval()
                    with torch.no_grad():
                        model(x[:256])  # mid-epoch validation
                    if switch_back:
                        model.train()
                rec.step()
        return model, rec.history


def _left_in_eval() -> nn.Module:
    return copy.deepcopy(_recorded_run(False)[0])


def _left_in_eval_history() -> dict[str, Any]:
    return {"history": _recorded_run(False)[1]}


def _switched_back() -> nn.Module:
    return copy.deepcopy(_recorded_run(True)[0])


def _switched_back_history() -> dict[str, Any]:
    return {"history": _recorded_run(True)[1]}


def _predict_no_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A predict() as often written: no_grad, but never model.eval()."""
    with torch.no_grad():
        return model(x).softmax(dim=1)


def _predict_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The corrected predict(): eval mode first."""
    model.eval()
    with torch.no_grad():
        return model(x).softmax(dim=1)


# --- helpers ---------------------------------------------------------------------------------------------------


def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _spec_or(text: str | None, placeholder: str) -> str:
    """A spec as the user could type it again, else a placeholder (objects passed in Python have none)."""
    if not text or " " in text:
        return placeholder
    if ":" in text or text.endswith((".py", ".pt", ".pth", ".ckpt", ".npz", ".csv")):
        return text
    return placeholder


def _recalibrate_cmd(ctx: RuleContext) -> str:
    model = _spec_or(ctx.source, "MODEL")
    data = _spec_or(getattr(ctx.data, "spec", None), "DATA")
    return f"bnaudit recalibrate {model} --data {data} -o recalibrated.pt"


def _batches(ctx: RuleContext, limit: int | None = None) -> Iterator[Any]:
    """The audit's batches on its device, floating inputs cast to the model's dtype (a bfloat16 model gets
    bfloat16 batches, as the graph pass gave it). Read from the data once per audit and shared, so that every
    experiment sees the same batches (a shuffling loader would deal each reader others) and BN304 can pair
    its eval-mode outputs with the train-mode pass BN302 ran."""
    if ctx.data is None:
        return iter(())

    def read() -> list[Any]:
        dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), None)
        return list(ctx.data.batches(limit=ctx.steps, device=ctx.device, dtype=dtype))

    batches = ctx.cached("modes.batches", read)
    return iter(batches if limit is None else batches[:limit])


def _predict_error(exc: BaseException) -> DataError:
    from bnaudit.loading.specs import describe_exception

    return DataError(
        f"predict() raised {describe_exception(exc)} on a batch of the data; make predict(model, inputs) accept "
        "one batch of --data inputs"
    )


def _state(ctx: RuleContext) -> Any:
    from bnaudit.probes.state import audit_state

    return audit_state(ctx)


def _train_pass(ctx: RuleContext) -> Any:
    """The one train-mode pass over the audit's batches that BN302, BN303 and BN304 read."""
    from bnaudit.probes.modes import train_mode_pass

    return ctx.cached("modes.train_pass", lambda: train_mode_pass(ctx.model, _batches(ctx), state=_state(ctx)))


def _fit(ctx: RuleContext) -> Any:
    from bnaudit.probes.modes import fit_from_pass

    return ctx.cached("modes.fit", lambda: fit_from_pass(_train_pass(ctx), ctx.model))


def _model_trained(model: nn.Module) -> bool:
    """Whether the model's BatchNorm layers show any sign of training: running buffers moved from their
    initial 0/1 or a batch counted, or affine parameters that vary from channel to channel
    (``probes.modes.affine_trained``: a gamma initialised to a constant, 0 included, is no sign of training).
    A fresh model, zero-initialised residual gammas and all, has neither."""
    from bnaudit.probes.modes import affine_trained

    for m in model.modules():
        if not is_batchnorm(m):
            continue
        if affine_trained(m):
            return True
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
            if not (torch.all(rm == 0) and torch.all(rv == 1)):
                return True
        nbt = getattr(m, "num_batches_tracked", None)
        if isinstance(nbt, torch.Tensor) and int(nbt) > 0:
            return True
    return False


def _mismatch(layer: Any, z_max: float, r_min: float, r_max: float) -> bool:
    if layer.z is None or layer.r is None:
        return False
    return layer.z > z_max or not (r_min <= layer.r <= r_max)


# --- rules -----------------------------------------------------------------------------------------------------


@register
class BatchDependentInference(Rule):
    """One sample's prediction changes with the other samples in its batch.

    A model's answer for a sample must not depend on what it is batched with. It does when inference runs
    with BatchNorm in train mode (a ``predict()`` that never calls ``model.eval()``: right after a training
    loop the model is still in train mode), when a BatchNorm was built with ``track_running_stats=False``, or
    when ``forward`` reduces over the batch dimension some other way. Then accuracy depends on batch size and
    composition, a batch of one fails ("Expected more than 1 value per channel when training") and served
    predictions differ from offline ones.

    Experiment: the first sample of the data goes through the inference path (the user's ``predict``; without
    ``--predict``, an eval-mode forward) inside two disjoint co-batches of real samples and alone, with the
    same RNG seed each time. The model is judged in the modes it is given in: one left in train mode after
    its training loop is probed in train mode, one evaluated once at load (``model.eval()`` then serving) in
    eval mode, where a ``predict()`` without ``model.eval()`` of its own is correct (BN308 notes that it
    relies on its caller). The finding reports the largest change of that sample's output relative to its
    scale (max |output|), the layers that normalized with batch statistics and any dropout that was active.

    A change is weighed against the model's own numerical noise before it counts: kernels pick their
    blocking, and on GPUs their precision (TF32 tensor cores above some size, plain float32 below), by batch
    size, so a deep network with no batch dependence at all can differ by 1e-4 between co-batches. When a
    change exceeds the tolerance, the same path runs on co-batches that no batch dependence through batch
    statistics can tell apart from the compared ones (the same co-batch with the sample moved to its end;
    the sample repeated to the co-batch's size, whose batch mean and variance are its own), and the change
    must also exceed 4 times the difference these show.

    Options:
        ```yaml
        tolerance: 1.0e-4   # relative output change tolerated; at least 2 x the machine epsilon of the model's
                            # dtype (bfloat16: 0.0156), and 4 x the noise measured when a change exceeds it
        cobatch_size: 8     # samples per co-batch, the probed sample included
        ```

    Bad:
        def predict(model, x):
            with torch.no_grad():
                return model(x).softmax(1)       # model still in train mode after training
    Good:
        def predict(model, x):
            model.eval()
            with torch.no_grad():
                return model(x).softmax(1)
    """

    code = "BN301"
    name = "batch-dependent-inference"
    severity = "error"
    summary = "a sample's prediction depends on the other samples in its batch"
    fix = "call model.eval() before inference in predict() (and model.train() again before the next training step)"
    family = "modes"
    requires = frozenset({"predict"})
    options = {"tolerance": float, "cobatch_size": int}
    defaults = {"tolerance": 1e-4, "cobatch_size": 8}
    invalid = (
        Example(_trained_mlp, _digits, predict=_predict_no_eval, note="predict() without model.eval()"),
        Example(_untracked_mlp, _digits, layer="1", note="BatchNorm1d(track_running_stats=False), eval-mode forward"),
        Example(_trained_cnn, _digits, predict=_predict_no_eval,
                note="BatchNorm2d left in train mode: a batch of one runs, only its co-batches differ"),
    )
    valid = (
        Example(_trained_mlp, _digits, predict=_predict_eval, note="the same predict() with model.eval()"),
        Example(_trained_mlp, _digits, note="no predict(): the eval-mode forward"),
        Example(_deployed, _digits, predict=_predict_no_eval,
                note="evaluated once at load: a predict() without model.eval() of its own is right here"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.modes import NOISE_MARGIN, cobatch_invariance

        size = max(2, self.config["cobatch_size"])
        dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), torch.float32)
        # Half-precision kernels may round differently for different batch sizes: never demand better than
        # two units in the last place of the model's dtype.
        tol = max(self.config["tolerance"], 2 * torch.finfo(dtype).eps)

        def probe() -> Any:
            try:
                return cobatch_invariance(
                    ctx.model, _batches(ctx), ctx.predict, cobatch_size=size, device=ctx.device, tolerance=tol,
                    state=_state(ctx),
                )
            except Exception as exc:  # noqa: BLE001 - the user's predict or forward failing on real data
                if ctx.predict is not None:
                    raise _predict_error(exc) from exc
                raise

        res = ctx.cached(f"modes.cobatch.{size}.{tol!r}", probe)
        if res.note:
            return
        changed = bool(res.changed)
        single = res.single_sample_error
        if single and not changed and not (res.batch_stat_layers or "value per channel" in single):
            single = None  # a forward that cannot take one sample for reasons of its own is not BN301's business
        if not changed and single is None:
            return
        path = "predict()" if res.used_predict else "the eval-mode forward"
        evidence: dict[str, Any] = {
            "max_abs_delta": res.max_abs_delta,
            "output_scale": res.scale,
            "relative_delta": res.relative,
            "tolerance": tol,
            **({"numerical_noise": res.noise, "noise_margin": NOISE_MARGIN} if res.noise is not None else {}),
            "cobatch_sizes": list(res.compared),
            "inference_path": "predict" if res.used_predict else "eval-forward",
        }
        if res.single_sample_error:
            evidence["single_sample_error"] = res.single_sample_error
        if res.active_dropout:
            evidence["active_dropout"] = list(res.active_dropout)
        noise = f", {NOISE_MARGIN:g}x its numerical noise {res.noise:.1e}" if res.noise is not None else ""
        what = (
            f"{path} gives one sample outputs that differ by up to {res.max_abs_delta:.3g} "
            f"({res.relative:.2%} of its output scale {res.scale:.3g}; tolerance {tol:.0e}{noise}) depending on "
            f"the other samples in its batch (co-batches of {', '.join(map(str, res.compared))})"
            if changed
            else f"{path} fails on a batch of one sample ({single})"
        )
        reported = False
        modules = dict(ctx.model.named_modules())
        if res.train_mode_layers:
            dropout = f"; dropout {_names(list(res.active_dropout))} was active too" if res.active_dropout else ""
            yield self.finding(
                None,
                f"{what}: BatchNorm {_names(list(res.train_mode_layers))} ran in train mode, normalizing with "
                f"batch statistics{dropout}",
                {**evidence, "train_mode_layers": list(res.train_mode_layers)},
                fix="call model.eval() at the start of predict() (and model.train() again before the next training "
                "step); a model is still in train mode right after its training loop",
            )
            reported = True
        for layer in res.untracked_layers:
            if layer in res.train_mode_layers and reported:
                continue
            yield self.finding(
                layer,
                f"{what}: {layer} ({type(modules[layer]).__name__}) was built with track_running_stats=False, so "
                "it normalizes with batch statistics in eval mode too",
                {**evidence, "track_running_stats": False},
                fix=f"construct {layer} with track_running_stats=True and fill its statistics with "
                f"`{_recalibrate_cmd(ctx)}`; or, if per-sample normalization was meant, swap it for GroupNorm "
                "(`bnaudit swap-norm MODEL --to group -o OUT`)",
            )
            reported = True
        if not reported:
            yield self.finding(
                None,
                f"{what}, although no BatchNorm normalized with batch statistics: something in forward() or "
                "predict() mixes the samples of a batch",
                evidence,
                fix="find the operation that reduces over the batch dimension (x.mean(0), x.std(0), a custom "
                "normalization) in forward() or predict() and make it per-sample, or use running statistics",
            )


@register
class InferenceMutatesStats(Rule):
    """Running statistics change while predicting: test data leaks into the model.

    Inference must leave the model exactly as it was. When ``predict()`` runs BatchNorm in train mode, every
    call overwrites the running mean and variance with a blend of the inputs it just saw: evaluation
    contaminates the statistics (test data leaks into the model), later predictions depend on what was
    predicted before, and a model saved after evaluation is not the model that was validated.

    Experiment: every buffer of the model, in the modes it is given in (as after a training loop, or
    evaluated once at load), is hashed (sha256 of its bytes) before and after ``predict()`` runs on two
    batches of the data; without ``--predict`` the inference path is an eval-mode forward. The finding names
    each layer whose buffers changed, with ``num_batches_tracked`` before/after and the largest change. A
    model given in eval mode moves no statistics, whatever its ``predict()`` (BN308 notes a ``predict()``
    that relies on that).

    Options: none.

    Bad:
        def predict(model, x):
            return model(x)                      # train mode: running_mean/var move on test data
    Good:
        def predict(model, x):
            model.eval()
            with torch.no_grad():
                return model(x)
    """

    code = "BN306"
    name = "inference-mutates-stats"
    severity = "error"
    summary = "predict() changes BatchNorm running statistics: test data leaks into the model"
    fix = "call model.eval() at the start of predict() so inference never updates running statistics"
    family = "modes"
    requires = frozenset({"predict"})
    invalid = (Example(_trained_mlp, _digits, predict=_predict_no_eval, note="predict() without model.eval()"),)
    valid = (
        Example(_trained_mlp, _digits, predict=_predict_eval, note="the same predict() with model.eval()"),
        Example(_trained_mlp, _digits, note="no predict(): the eval-mode forward"),
        Example(_deployed, _digits, predict=_predict_no_eval,
                note="evaluated once at load: nothing moves, whatever predict() does about modes"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.modes import predict_mutations

        def probe() -> Any:
            try:
                return predict_mutations(ctx.model, _batches(ctx), ctx.predict, device=ctx.device, state=_state(ctx))
            except Exception as exc:  # noqa: BLE001
                if ctx.predict is not None:
                    raise _predict_error(exc) from exc
                raise

        res = ctx.cached("modes.mutations", probe)
        if res.note or not res.changes:
            return
        modules = dict(ctx.model.named_modules())
        bn = [c for c in res.changes if is_batchnorm(modules.get(c.layer, nn.Identity()))]
        other = [c for c in res.changes if c not in bn]
        path = "predict()" if res.used_predict else "the eval-mode forward"
        layers = [c.layer or "<model>" for c in res.changes]
        evidence: dict[str, Any] = {
            "inference_path": "predict" if res.used_predict else "eval-forward",
            "calls": res.calls,
            "samples": res.samples,
            "changed": {
                (c.layer or "<model>"): {
                    "buffers": list(c.buffers),
                    "max_abs_delta": round(c.max_abs_delta, 6),
                    **({"num_batches_tracked": list(c.num_batches_tracked)} if c.num_batches_tracked else {}),
                }
                for c in res.changes
            },
        }
        detail = ""
        if bn and bn[0].num_batches_tracked:
            before, after = bn[0].num_batches_tracked
            detail = f"; {bn[0].layer}.num_batches_tracked went {before} -> {after}"
        if bn:
            message = (
                f"{path} on {res.calls} batch(es) of {res.samples} samples changed the running statistics of "
                f"{len(bn)} BatchNorm layer(s) ({_names([c.layer for c in bn])}; largest change "
                f"{max(c.max_abs_delta for c in bn):.3g}){detail}: test data leaks into the model"
            )
            if other:
                message += f"; buffers of {_names([c.layer or '<model>' for c in other])} changed too"
        else:
            message = f"{path} changed buffers of {_names(layers)}: inference is not side-effect free"
        yield self.finding(
            None,
            message,
            evidence,
            fix="call model.eval() at the start of predict() so inference never updates running statistics; "
            "statistics already polluted by evaluation can be re-estimated on training data with "
            f"`{_recalibrate_cmd(ctx)}`",
        )


@register
class StaleRunningStats(Rule):
    """Running statistics that do not describe the data: eval mode normalizes with the wrong numbers.

    In eval mode a BatchNorm layer normalizes with its running mean and variance; when they are far from the
    statistics of the data the model serves (the data shifted after training, momentum too high or too low,
    statistics frozen from another domain) every downstream activation is off and accuracy drops in eval mode
    only (Ioffe & Szegedy 2015, section 3.1; Li et al. 2016, AdaBN).

    Measures, per BatchNorm layer, from the train-mode statistics of the data (BatchNorm layers in train
    mode, dropout off; per channel c the mean m_c and unbiased variance v_c averaged over batches as
    ``momentum=None`` would):
    ``z = mean_c |m_c - running_mean_c| / sqrt(running_var_c + eps)`` (the shift eval mode applies, in
    standard deviations) and ``r = mean_c (v_c + eps) / (running_var_c + eps)`` (the variance ratio; 1 is a
    perfect fit). Layers whose buffers are still at their initial values are BN303's.

    Options:
        ```yaml
        z_max: 0.25         # mean shift tolerated, in running standard deviations
        r_min: 0.7          # variance ratio range tolerated
        r_max: 1.4
        min_samples: 32     # values per channel needed before judging (fewer: too noisy, not reported)
        ```

    Bad:
        model trained on data A, then served on data B (brighter, rescaled, another sensor)
    Good:
        model recalibrated on B: bnaudit recalibrate model.py --data b.npz -o model_b.pt
    """

    code = "BN302"
    name = "stale-running-stats"
    severity = "warning"
    summary = "BatchNorm running statistics do not match the data's statistics"
    fix = "re-estimate the running statistics on this data with `bnaudit recalibrate MODEL --data DATA -o OUT`"
    family = "modes"
    requires = frozenset({"data"})
    options = {"z_max": float, "r_min": float, "r_max": float, "min_samples": int}
    defaults = {"z_max": 0.25, "r_min": 0.7, "r_max": 1.4, "min_samples": 32}
    invalid = (
        Example(_trained_mlp, _shifted_digits, layer="1", note="trained on digits, audited on brighter digits"),
    )
    valid = (Example(_trained_mlp, _digits, note="audited on the data it was trained on"),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        z_max, r_min, r_max = self.config["z_max"], self.config["r_min"], self.config["r_max"]
        fit = _fit(ctx)
        for name, layer in fit.layers.items():
            if not layer.tracks or layer.at_init or layer.samples < self.config["min_samples"]:
                continue
            if not _mismatch(layer, z_max, r_min, r_max):
                continue
            why = []
            if layer.z > z_max:
                why.append(f"mean shift z={layer.z:.3g} > {z_max:g}")
            if not r_min <= layer.r <= r_max:
                why.append(f"variance ratio r={layer.r:.3g} outside [{r_min:g}, {r_max:g}]")
            yield self.finding(
                name,
                f"{name}'s running statistics do not describe this data ({'; '.join(why)}; worst channel shift "
                f"{layer.z_max:.3g}, variance ratios {layer.r_min:.3g}-{layer.r_max:.3g} over {layer.channels} "
                f"channels, {fit.samples} samples)",
                {
                    "z": layer.z,
                    "r": layer.r,
                    "z_max_channel": layer.z_max,
                    "r_min_channel": layer.r_min,
                    "r_max_channel": layer.r_max,
                    "z_max": z_max,
                    "r_min": r_min,
                    "r_max": r_max,
                    "channels": layer.channels,
                    "batches": fit.batches,
                    "samples": fit.samples,
                    "num_batches_tracked": layer.num_batches_tracked,
                },
                fix=f"re-estimate the running statistics on the data the model serves: `{_recalibrate_cmd(ctx)}` "
                "(or torch.optim.swa_utils.update_bn(loader, model) in code); if this data is a new domain on "
                "purpose, recalibrate on that domain",
            )


@register
class UninitializedRunningStats(Rule):
    """Trained weights with BatchNorm buffers still at their initial values.

    A BatchNorm layer starts with running_mean = 0, running_var = 1 and num_batches_tracked = 0. A trained
    model whose buffers are still there normalizes nothing in eval mode. The usual cause is a weight average
    that skipped the buffers: a hand-written EMA or SWA over ``parameters()`` only, on a copy made before
    training, or a state_dict loaded with ``strict=False`` that had no buffers. (torch's ``AveragedModel``
    copies the source model's buffers instead, which are stale for the averaged weights: BN302/BN304 catch
    that, and ``update_bn`` is the fix for both.)

    Fires for a layer whose buffers sit exactly at their initial values while the model's BatchNorm layers
    show training (other running buffers moved, or affine parameters that vary from channel to channel) and
    the data's train-mode statistics do not match the initial values (z or r outside the BN302 thresholds, so
    data that happens to be N(0, 1) passes). A fresh, untrained model is not reported: initialisation sets
    gamma and beta to one constant per layer, which need not be 1 and 0 (torchvision's
    ``zero_init_residual`` and timm's ``zero_init_last`` start the last BatchNorm of each residual branch at
    gamma = 0), so a constant gamma is no sign of training.

    Options:
        ```yaml
        z_max: 0.25
        r_min: 0.7
        r_max: 1.4
        min_samples: 32
        ```

    Bad:
        ema = copy.deepcopy(model)            # EMA over parameters() only, buffers never touched
        for p_ema, p in zip(ema.parameters(), model.parameters()): p_ema.lerp_(p, 0.1)
    Good:
        ...; torch.optim.swa_utils.update_bn(train_loader, ema)   # after averaging
    """

    code = "BN303"
    name = "uninitialized-running-stats"
    severity = "error"
    summary = "trained weights paired with BatchNorm buffers that were never estimated"
    fix = "estimate the buffers: torch.optim.swa_utils.update_bn(train_loader, model), or `bnaudit recalibrate`"
    family = "modes"
    requires = frozenset({"data"})
    options = {"z_max": float, "r_min": float, "r_max": float, "min_samples": int}
    defaults = {"z_max": 0.25, "r_min": 0.7, "r_max": 1.4, "min_samples": 32}
    invalid = (
        Example(_ema_params_only, _digits, layer="1", note="an EMA over parameters() only: buffers never set"),
    )
    valid = (
        Example(_ema_with_update_bn, _digits, note="the same EMA followed by update_bn"),
        Example(_untrained_mlp, _digits, note="a fresh model: nothing was trained yet"),
        Example(_zero_init_last_mlp, _digits, note="a fresh model with a zero-initialised gamma"),
        Example(_dcgan_init_mlp, _digits, note="a fresh model with gamma drawn around 1"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        z_max, r_min, r_max = self.config["z_max"], self.config["r_min"], self.config["r_max"]
        fit = _fit(ctx)
        if not _model_trained(ctx.model):
            return
        for name, layer in fit.layers.items():
            if not layer.tracks or not layer.at_init or layer.samples < self.config["min_samples"]:
                continue
            if not _mismatch(layer, z_max, r_min, r_max):
                continue
            yield self.finding(
                name,
                f"{name}'s running statistics were never estimated (running_mean=0, running_var=1, "
                f"num_batches_tracked={layer.num_batches_tracked}) but the model is trained: on this data eval "
                f"mode shifts it by z={layer.z:.3g} and scales its variance by r={layer.r:.3g} "
                f"(thresholds z>{z_max:g}, r outside [{r_min:g}, {r_max:g}])",
                {
                    "running_mean": 0.0,
                    "running_var": 1.0,
                    "num_batches_tracked": layer.num_batches_tracked,
                    "affine_trained": layer.affine_trained,
                    "z": layer.z,
                    "r": layer.r,
                    "z_max": z_max,
                    "r_min": r_min,
                    "r_max": r_max,
                    "samples": fit.samples,
                },
                fix="estimate the buffers after averaging: torch.optim.swa_utils.update_bn(train_loader, model) "
                f"(or AveragedModel(..., use_buffers=True) for an EMA), or `{_recalibrate_cmd(ctx)}`",
            )


@register
class TrainEvalGap(Rule):
    """The model is much worse in eval mode than in train mode on the same batches.

    Train mode normalizes every batch with its own statistics; eval mode uses the running statistics. When
    eval-mode loss (or accuracy) is far worse on the very same batches, the running statistics are what is
    broken: stale or never estimated (BN302, BN303), momentum wrong for the number of steps, or batches too
    small for batch statistics to mean anything. This is the symptom users see ("accuracy collapses in eval
    mode") and both numbers are reported.

    Experiment: the same batches through one copy in eval mode and another with BatchNorm in train mode
    (dropout off in both, so the gap is normalization alone). The metric is cross-entropy (and top-1
    accuracy) for integer class targets, mean squared error for float targets shaped like the output, else
    the relative RMS change of the output. A model whose normalization layers were never trained is not
    reported (the gap of a fresh model means nothing).

    Options:
        ```yaml
        max_loss_ratio: 1.5       # eval loss / train loss tolerated ...
        min_loss_delta: 0.1       # ... unless the absolute difference is below this
        max_accuracy_drop: 0.1    # train-mode minus eval-mode accuracy tolerated
        max_output_change: 0.5    # without targets: RMS(train - eval) / RMS(eval) tolerated
        ```

    Bad:
        eval-mode loss 4.1 vs train-mode loss 0.3 on the same batches (buffers never estimated)
    Good:
        eval-mode loss 0.31 vs train-mode loss 0.30 after `bnaudit recalibrate`
    """

    code = "BN304"
    name = "train-eval-gap"
    severity = "warning"
    summary = "eval-mode loss or output far from train-mode on the same batches"
    fix = "re-estimate the running statistics with `bnaudit recalibrate MODEL --data DATA -o OUT`"
    family = "modes"
    requires = frozenset({"data"})
    options = {"max_loss_ratio": float, "min_loss_delta": float, "max_accuracy_drop": float, "max_output_change": float}
    defaults = {"max_loss_ratio": 1.5, "min_loss_delta": 0.1, "max_accuracy_drop": 0.1, "max_output_change": 0.5}
    invalid = (
        Example(_ema_params_only, _digits, note="EMA weights with buffers never set: eval mode collapses"),
        Example(_trained_mlp, lambda: _shifted_digits()[0], note="no targets: outputs compared"),
    )
    valid = (
        Example(_trained_mlp, _digits, note="trained model on its own data"),
        Example(_ema_with_update_bn, _digits, note="the same EMA followed by update_bn"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.modes import train_eval_gap

        if not _model_trained(ctx.model):
            return
        res = ctx.cached(
            "modes.gap",
            lambda: train_eval_gap(ctx.model, _batches(ctx), state=_state(ctx), train_pass=_train_pass(ctx)),
        )
        if res.note:
            return
        cmd = _recalibrate_cmd(ctx)
        fix = (
            f"re-estimate the running statistics on training data with `{cmd}` (see BN302/BN303 for which layers); "
            "if the gap persists, the batches are too small for BatchNorm: use larger batches or GroupNorm "
            "(`bnaudit swap-norm MODEL --to group -o OUT`)"
        )
        base = {"metric": res.metric, "batches": res.batches, "samples": res.samples}
        if res.metric == "output":
            limit = self.config["max_output_change"]
            if res.relative_change <= limit:
                return
            yield self.finding(
                None,
                f"on the same {res.samples} samples the eval-mode output differs from the train-mode output by "
                f"{res.relative_change:.2f}x its RMS (train-mode RMS {res.train_value:.3g}, eval-mode RMS "
                f"{res.eval_value:.3g}; tolerance {limit:g})",
                {**base, "train_rms": res.train_value, "eval_rms": res.eval_value,
                 "relative_change": res.relative_change, "max_output_change": limit},
                fix=fix,
            )
            return
        ratio_limit, delta_limit = self.config["max_loss_ratio"], self.config["min_loss_delta"]
        acc_limit = self.config["max_accuracy_drop"]
        ratio = res.eval_value / res.train_value if res.train_value > 0 else float("inf")
        loss_bad = ratio > ratio_limit and res.eval_value - res.train_value > delta_limit
        drop = None
        if res.train_accuracy is not None and res.eval_accuracy is not None:
            drop = res.train_accuracy - res.eval_accuracy
        acc_bad = drop is not None and drop > acc_limit
        if not (loss_bad or acc_bad):
            return
        label = "cross-entropy" if res.metric == "cross_entropy" else "mean squared error"
        acc = (
            f"; accuracy {res.eval_accuracy:.1%} in eval mode vs {res.train_accuracy:.1%} in train mode"
            if drop is not None
            else ""
        )
        yield self.finding(
            None,
            f"on the same {res.samples} samples the eval-mode {label} is {res.eval_value:.3g} vs "
            f"{res.train_value:.3g} in train mode ({ratio:.2f}x; tolerated {ratio_limit:g}x or +{delta_limit:g}){acc}",
            {
                **base,
                "train_loss": res.train_value,
                "eval_loss": res.eval_value,
                "loss_ratio": ratio,
                "max_loss_ratio": ratio_limit,
                "min_loss_delta": delta_limit,
                "train_accuracy": res.train_accuracy,
                "eval_accuracy": res.eval_accuracy,
                "max_accuracy_drop": acc_limit,
            },
            fix=fix,
        )


@register
class FrozenBNDrifts(Rule):
    """Frozen BatchNorm layers that still update their running statistics.

    Freezing a pretrained backbone with ``requires_grad_(False)`` freezes gamma and beta but not the running
    statistics: after ``model.train()`` its BatchNorm layers are in train mode, normalize with the statistics
    of each (often small, fine-tuning) batch and overwrite the pretrained running mean and variance. The head
    is then trained on features that eval mode will not reproduce. Detectron2 and torchvision ship
    ``FrozenBatchNorm2d`` for exactly this.

    Fires for each BatchNorm layer whose affine parameters all have ``requires_grad=False`` while it is in
    train mode, or will be after ``model.train()`` (checked on a copy, so a ``train()`` override that keeps
    frozen layers in eval mode is honoured) and the rest of the model trains. With data, one train-mode
    forward on a copy measures how far its buffers move (a layer whose buffers do not move is not reported).

    Options: none.

    Bad:
        for p in model.backbone.parameters(): p.requires_grad_(False)
        model.train()                              # backbone BatchNorms now drift
    Good:
        def train(self, mode=True):
            super().train(mode)
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm): m.eval()
            return self
    """

    code = "BN305"
    name = "frozen-bn-drifts"
    severity = "warning"
    summary = "BatchNorm with frozen weights still updates its running statistics in train mode"
    fix = "keep frozen BatchNorm layers in eval mode (override train()), or use FrozenBatchNorm2d"
    family = "modes"
    requires = frozenset()
    invalid = (
        Example(_frozen_backbone, _digits, layer="backbone.1", note="frozen backbone, model.train()"),
    )
    valid = (
        Example(_frozen_backbone_kept_eval, _digits, note="train() override keeps frozen BatchNorm in eval"),
        Example(_deployed, _digits, note="inference-only: everything frozen, eval mode"),
        Example(_trained_mlp, _digits, note="nothing frozen"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.modes import frozen_bn_drift

        def probe() -> Any:
            batch = next(iter(_batches(ctx, limit=1)), None) if ctx.data is not None else None
            return frozen_bn_drift(ctx.model, batch, device=ctx.device, state=_state(ctx))

        res = ctx.cached("modes.frozen", probe)
        for layer in res.layers:
            if not layer.training_now and res.trainable_params == 0:
                continue  # nothing in the model trains: model.train() is not going to be called for training
            if res.forward_ran and layer.moved is False:
                continue
            when = "is in train mode" if layer.training_now else "will be in train mode after model.train()"
            moved = ""
            evidence: dict[str, Any] = {
                "requires_grad": False,
                "training": layer.training_now,
                "training_after_train": layer.training_after_train,
                "trainable_params": res.trainable_params,
            }
            if res.forward_ran:
                moved = (
                    f"; one train-mode forward moved its running_mean by up to {layer.mean_shift:.3g} running "
                    f"standard deviations and its running_var by up to {layer.var_ratio:.3g}x"
                )
                evidence.update({"mean_shift": layer.mean_shift, "var_ratio": layer.var_ratio})
                if layer.num_batches_tracked:
                    evidence["num_batches_tracked"] = list(layer.num_batches_tracked)
            yield self.finding(
                layer.layer,
                f"{layer.layer}'s weight and bias are frozen (requires_grad=False) but it {when}, so its running "
                f"statistics keep moving with every batch{moved}",
                evidence,
                fix=f"keep {layer.layer} in eval mode while training: override train() to call .eval() on frozen "
                "BatchNorm layers, or replace them with FrozenBatchNorm2d (`bnaudit swap-norm MODEL --to frozen "
                "-o OUT`); if it should adapt, unfreeze its weight and bias",
            )


@register
class TrainingInEvalMode(Rule):
    """Optimizer steps taken while a trainable BatchNorm sat in eval mode.

    A validation pass in the middle of an epoch calls ``model.eval()``; if the loop does not call
    ``model.train()`` again, the remaining steps train with BatchNorm normalizing by its (frozen) running
    statistics: its ``num_batches_tracked`` stalls, the statistics stop following the weights, gradients no
    longer see batch normalization and training dynamics change silently (dropout is off too).

    Reads a recorded training history (``bnaudit.record``): per BatchNorm layer and recorded step, its
    training flag, ``num_batches_tracked`` and whether its affine parameters require grad, plus whether the
    step changed any parameter. A step counts when the layer is trainable, an optimizer step ran, its flag is
    False and its counter did not advance since the previous step (the counter rules out the step in which
    the validation itself happened). Layers with the same counted steps are reported together.

    Options:
        ```yaml
        min_steps: 1        # counted steps needed before reporting a layer
        ```

    Bad:
        for step, (x, y) in enumerate(loader):
            ...; opt.step()
            if step % 500 == 0: validate(model)     # calls model.eval() and never switches back
    Good:
            if step % 500 == 0: validate(model); model.train()
    """

    code = "BN307"
    name = "training-in-eval-mode"
    severity = "warning"
    summary = "optimizer steps while a trainable BatchNorm is in eval mode (its statistics stall)"
    fix = "call model.train() after every validation pass, before the next training step"
    family = "modes"
    requires = frozenset({"history"})
    options = {"min_steps": int}
    defaults = {"min_steps": 1}
    invalid = (
        Example(_left_in_eval, None, context=_left_in_eval_history,
                note="validation calls model.eval() mid-training and nothing switches back"),
    )
    valid = (
        Example(_switched_back, None, context=_switched_back_history,
                note="the same loop with model.train() after validation"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.modes import history_eval_mode_steps

        try:
            spans = history_eval_mode_steps(ctx.history)
        except TypeError as exc:
            raise DataError(f"{exc}; pass history=rec.history from `with bnaudit.record(model) as rec:`") from exc
        need = max(1, self.config["min_steps"])
        groups: dict[tuple[int, ...], list[Any]] = {}
        for span in spans:
            if len(span.steps) >= need and span.layer not in ctx.unused:  # a layer that never runs is BN112's
                groups.setdefault(span.steps, []).append(span)
        for steps, group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0].layer)):
            first = group[0]
            layers = [g.layer for g in group]
            stalled = (
                f"; num_batches_tracked stalled at {first.stalled_at}" if first.stalled_at is not None else ""
            )
            modules = dict(ctx.model.named_modules())
            if len(layers) == 1:
                kind = type(modules[layers[0]]).__name__ if layers[0] in modules else "BatchNorm"
                who, its = f"{kind} {layers[0]}", "its"
            else:
                who, its = f"{len(layers)} BatchNorm layers ({_names(layers)})", "their"
            info = getattr(getattr(ctx.history, "history", ctx.history), "bn_info", {})
            affine = any(info.get(name, {}).get("affine", True) for name in layers)
            trained = f"{its} weights were being trained" if affine else "the model was being trained"
            yield self.finding(
                layers[0] if len(layers) == 1 else None,
                f"{who} stayed in eval mode for {len(steps)} of {first.trained_steps} recorded optimizer steps "
                f"(steps {first.first}-{first.last}) while {trained}{stalled}",
                {
                    "layers": layers,
                    "eval_steps": len(steps),
                    "trained_steps": first.trained_steps,
                    "recorded_steps": first.total_steps,
                    "first_step": first.first,
                    "last_step": first.last,
                    "num_batches_tracked_stalled_at": first.stalled_at,
                    "confirmed_by_counter": first.confirmed,
                    "min_steps": need,
                },
                fix=f"call model.train() after every validation pass (it left the model in eval mode from step "
                f"{first.first}); if these layers are meant to stay in eval mode, freeze their weight and bias too",
            )


@register
class PredictReliesOnEvalMode(Rule):
    """``predict()`` never calls ``model.eval()``: it is right only while its caller has.

    The serving recipe evaluates a model once at load (``model.eval(); model.requires_grad_(False)``) and
    calls a ``predict()`` that runs ``torch.inference_mode()`` without switching modes itself. BN301 and BN306
    judge such a model in eval mode, as given, and find nothing wrong. The same ``predict()`` handed a model
    straight out of its training loop (still in train mode) would normalize with batch statistics and write
    its inputs into the running statistics: the errors BN301 and BN306 report on such a model. This is a
    note, not an error: whether any caller can pass a model in train mode is the user's call.

    Experiment: only for a model given with BatchNorm layers (tracking running statistics) in eval mode and
    a ``--predict``: ``predict()`` is called once more, on the first two samples, after ``model.train()``,
    and the layers that then normalize with batch statistics are named. The model is put back afterwards.

    Options: none.

    Bad:
        def predict(model, x):                   # right only if the caller called model.eval()
            with torch.inference_mode():
                return model(x).softmax(1)
    Good:
        def predict(model, x):
            model.eval()
            with torch.inference_mode():
                return model(x).softmax(1)
    """

    code = "BN308"
    name = "predict-relies-on-eval-mode"
    severity = "info"
    summary = "predict() never calls model.eval(): it is right only on a model its caller put in eval mode"
    fix = "call model.eval() at the start of predict(), so it is right whatever mode its caller leaves the model in"
    family = "modes"
    requires = frozenset({"predict"})
    invalid = (
        Example(_deployed, _digits, predict=_predict_no_eval, layer=None,
                note="evaluated once at load; predict() without model.eval()"),
    )
    valid = (
        Example(_deployed, _digits, predict=_predict_eval, note="the same model, predict() with model.eval()"),
        Example(_trained_mlp, _digits, predict=_predict_no_eval,
                note="given in train mode: BN301 and BN306 report it, this note does not"),
        Example(_deployed, _digits, note="no predict(): nothing relies on anything"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.modes import predict_train_mode_layers, tracks_running_stats

        if ctx.predict is None:
            return
        evaluated = [
            n for n, m in ctx.model.named_modules() if is_batchnorm(m) and tracks_running_stats(m) and not m.training
        ]
        batch = next(iter(_batches(ctx, limit=1)), None)
        if not evaluated or batch is None:
            return

        def probe() -> Any:
            try:
                return predict_train_mode_layers(ctx.model, batch, ctx.predict, device=ctx.device, state=_state(ctx))
            except Exception as exc:  # noqa: BLE001
                raise _predict_error(exc) from exc

        layers = [n for n in ctx.cached("modes.predict_train_mode", probe) if n in evaluated]
        if not layers:
            return
        yield self.finding(
            None,
            f"predict() never calls model.eval(): it is right on this model, given in eval mode, but on a model "
            f"in train mode (as after its training loop) BatchNorm {_names(layers)} would normalize with batch "
            "statistics and update their running statistics",
            {"train_mode_layers": layers, "eval_mode_layers_given": len(evaluated)},
        )


__all__ = [
    "BatchDependentInference",
    "FrozenBNDrifts",
    "InferenceMutatesStats",
    "PredictReliesOnEvalMode",
    "StaleRunningStats",
    "TrainEvalGap",
    "TrainingInEvalMode",
    "UninitializedRunningStats",
]
