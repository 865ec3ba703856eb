"""BN3xx, eval mode: inference that depends on the batch or changes the running statistics, and training or
predicting in the wrong mode. Each finding is backed by an experiment on the audit's copy of the model (put
back after each experiment); the running-statistics rules of the family live in ``running_stats``.

The BatchNorm failures users report most are not architectural: inference run in train mode, test data
leaking into the running statistics, a validation pass that leaves the model in eval mode for the rest of
training, a predict() that only works because someone called eval() before it. The experiments live in
``bnaudit.probes``; the rules here set thresholds, name layers and say what to change. Each rule's docstring
is its documentation (``bnaudit rules BN301``); the ``valid``/``invalid`` examples (``examples_modes``) are
small models trained for a fraction of a second on scikit-learn's digits, built the way users write them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.errors import DataError
from bnaudit.findings import Finding
from bnaudit.layers import is_batchnorm
from bnaudit.rules import examples_modes as ex
from bnaudit.rules.base import Example, Rule, register
from bnaudit.rules.common import audit_batches, name_list, probe_state, recalibrate_cmd


def _predict_error(exc: BaseException) -> DataError:
    from bnaudit.loading.specs import describe_exception

    return DataError(
        f"predict() raised {describe_exception(exc)} on a batch of the data; make predict(model, inputs) accept "
        "one batch of --data inputs"
    )


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
        Example(ex.trained_mlp, ex.digits, predict=ex.predict_no_eval, note="predict() without model.eval()"),
        Example(ex.untracked_mlp, ex.digits, layer="1", note="BatchNorm1d(track_running_stats=False), eval-mode forward"),
        Example(ex.trained_cnn, ex.digits, predict=ex.predict_no_eval,
                note="BatchNorm2d left in train mode: a batch of one runs, only its co-batches differ"),
    )
    valid = (
        Example(ex.trained_mlp, ex.digits, predict=ex.predict_eval, note="the same predict() with model.eval()"),
        Example(ex.trained_mlp, ex.digits, note="no predict(): the eval-mode forward"),
        Example(ex.deployed, ex.digits, predict=ex.predict_no_eval,
                note="evaluated once at load: a predict() without model.eval() of its own is right here"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.inference import NOISE_MARGIN, cobatch_invariance

        size = max(2, self.config["cobatch_size"])
        dtype = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), torch.float32)
        # Half-precision kernels may round differently for different batch sizes: never demand better than
        # two units in the last place of the model's dtype.
        tol = max(self.config["tolerance"], 2 * torch.finfo(dtype).eps)

        def probe() -> Any:
            try:
                return cobatch_invariance(
                    ctx.model, audit_batches(ctx), ctx.predict, cobatch_size=size, device=ctx.device, tolerance=tol,
                    state=probe_state(ctx),
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
            dropout = f"; dropout {name_list(list(res.active_dropout))} was active too" if res.active_dropout else ""
            yield self.finding(
                None,
                f"{what}: BatchNorm {name_list(list(res.train_mode_layers))} ran in train mode, normalizing with "
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
                f"`{recalibrate_cmd(ctx)}`; or, if per-sample normalization was meant, swap it for GroupNorm "
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
    invalid = (Example(ex.trained_mlp, ex.digits, predict=ex.predict_no_eval, note="predict() without model.eval()"),)
    valid = (
        Example(ex.trained_mlp, ex.digits, predict=ex.predict_eval, note="the same predict() with model.eval()"),
        Example(ex.trained_mlp, ex.digits, note="no predict(): the eval-mode forward"),
        Example(ex.deployed, ex.digits, predict=ex.predict_no_eval,
                note="evaluated once at load: nothing moves, whatever predict() does about modes"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.inference import predict_mutations

        def probe() -> Any:
            try:
                return predict_mutations(ctx.model, audit_batches(ctx), ctx.predict, device=ctx.device, state=probe_state(ctx))
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
                f"{len(bn)} BatchNorm layer(s) ({name_list([c.layer for c in bn])}; largest change "
                f"{max(c.max_abs_delta for c in bn):.3g}){detail}: test data leaks into the model"
            )
            if other:
                message += f"; buffers of {name_list([c.layer or '<model>' for c in other])} changed too"
        else:
            message = f"{path} changed buffers of {name_list(layers)}: inference is not side-effect free"
        yield self.finding(
            None,
            message,
            evidence,
            fix="call model.eval() at the start of predict() so inference never updates running statistics; "
            "statistics already polluted by evaluation can be re-estimated on training data with "
            f"`{recalibrate_cmd(ctx)}`",
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
    the validation itself happened), unless the model itself was in train mode: BatchNorm held in eval mode
    inside a training model is deliberate (``norm_eval``, statistics frozen while fine-tuning). Layers with
    the same counted steps are reported together.

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
        Example(ex.left_in_eval, None, context=ex.left_in_eval_history,
                note="validation calls model.eval() mid-training and nothing switches back"),
    )
    valid = (
        Example(ex.switched_back, None, context=ex.switched_back_history,
                note="the same loop with model.train() after validation"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.eval_steps import history_eval_mode_steps

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
                who, its = f"{len(layers)} BatchNorm layers ({name_list(layers)})", "their"
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
        Example(ex.deployed, ex.digits, predict=ex.predict_no_eval, layer=None,
                note="evaluated once at load; predict() without model.eval()"),
    )
    valid = (
        Example(ex.deployed, ex.digits, predict=ex.predict_eval, note="the same model, predict() with model.eval()"),
        Example(ex.trained_mlp, ex.digits, predict=ex.predict_no_eval,
                note="given in train mode: BN301 and BN306 report it, this note does not"),
        Example(ex.deployed, ex.digits, note="no predict(): nothing relies on anything"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.common import tracks_running_stats
        from bnaudit.probes.inference import predict_train_mode_layers

        if ctx.predict is None:
            return
        evaluated = [
            n for n, m in ctx.model.named_modules() if is_batchnorm(m) and tracks_running_stats(m) and not m.training
        ]
        batch = next(iter(audit_batches(ctx, limit=1)), None)
        if not evaluated or batch is None:
            return

        def probe() -> Any:
            try:
                return predict_train_mode_layers(ctx.model, batch, ctx.predict, device=ctx.device, state=probe_state(ctx))
            except Exception as exc:  # noqa: BLE001
                raise _predict_error(exc) from exc

        layers = [n for n in ctx.cached("modes.predict_train_mode", probe) if n in evaluated]
        if not layers:
            return
        yield self.finding(
            None,
            f"predict() never calls model.eval(): it is right on this model, given in eval mode, but on a model "
            f"in train mode (as after its training loop) BatchNorm {name_list(layers)} would normalize with batch "
            "statistics and update their running statistics",
            {"train_mode_layers": layers, "eval_mode_layers_given": len(evaluated)},
        )


__all__ = [
    "BatchDependentInference",
    "InferenceMutatesStats",
    "PredictReliesOnEvalMode",
    "TrainingInEvalMode",
]
