"""BN3xx, running statistics: buffers estimated on other data, never estimated, far from what train mode
computes, or drifting in a frozen backbone. Each finding is backed by an experiment on the audit's copy of
the model (put back after each experiment); the eval-mode rules of the family live in ``modes``.

SWA/EMA weights paired with buffers that were never estimated, frozen backbones whose statistics keep
drifting, eval accuracy collapsing while train-mode accuracy looks fine: the experiments live in
``bnaudit.probes``; the rules here set thresholds, name layers and say what to change. Each rule's docstring
is its documentation (``bnaudit rules BN302``); the ``valid``/``invalid`` examples (``examples_modes``) are
small models trained for a fraction of a second on scikit-learn's digits, built the way users write them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.findings import Finding
from bnaudit.layers import is_batchnorm
from bnaudit.rules import examples_modes as ex
from bnaudit.rules.base import Example, Rule, register
from bnaudit.rules.common import audit_batches, probe_state, recalibrate_cmd


def _train_pass(ctx: RuleContext) -> Any:
    """The one train-mode pass over the audit's batches that BN302, BN303 and BN304 read."""
    from bnaudit.probes.running_stats import train_mode_pass

    return ctx.cached(
        "modes.train_pass", lambda: train_mode_pass(ctx.model, audit_batches(ctx), state=probe_state(ctx))
    )


def _fit(ctx: RuleContext) -> Any:
    from bnaudit.probes.running_stats import fit_from_pass

    return ctx.cached("modes.fit", lambda: fit_from_pass(_train_pass(ctx), ctx.model))


def _model_trained(model: nn.Module) -> bool:
    """Whether the model's BatchNorm layers show any sign of training: running buffers moved from their
    initial 0/1 or a batch counted, or affine parameters that vary from channel to channel
    (``probes.common.affine_trained``: a gamma initialised to a constant, 0 included, is no sign of training).
    A fresh model, zero-initialised residual gammas and all, has neither."""
    from bnaudit.probes.common import affine_trained

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
        Example(ex.trained_mlp, ex.shifted_digits, layer="1", note="trained on digits, audited on brighter digits"),
    )
    valid = (Example(ex.trained_mlp, ex.digits, note="audited on the data it was trained on"),)

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
                fix=f"re-estimate the running statistics on the data the model serves: `{recalibrate_cmd(ctx)}` "
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
        Example(ex.ema_params_only, ex.digits, layer="1", note="an EMA over parameters() only: buffers never set"),
    )
    valid = (
        Example(ex.ema_with_update_bn, ex.digits, note="the same EMA followed by update_bn"),
        Example(ex.untrained_mlp, ex.digits, note="a fresh model: nothing was trained yet"),
        Example(ex.zero_init_last_mlp, ex.digits, note="a fresh model with a zero-initialised gamma"),
        Example(ex.dcgan_init_mlp, ex.digits, note="a fresh model with gamma drawn around 1"),
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
                f"(or AveragedModel(..., use_buffers=True) for an EMA), or `{recalibrate_cmd(ctx)}`",
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
        Example(ex.ema_params_only, ex.digits, note="EMA weights with buffers never set: eval mode collapses"),
        Example(ex.trained_mlp, lambda: ex.shifted_digits()[0], note="no targets: outputs compared"),
    )
    valid = (
        Example(ex.trained_mlp, ex.digits, note="trained model on its own data"),
        Example(ex.ema_with_update_bn, ex.digits, note="the same EMA followed by update_bn"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.train_eval import train_eval_gap

        if not _model_trained(ctx.model):
            return
        res = ctx.cached(
            "modes.gap",
            lambda: train_eval_gap(ctx.model, audit_batches(ctx), state=probe_state(ctx), train_pass=_train_pass(ctx)),
        )
        if res.note:
            return
        cmd = recalibrate_cmd(ctx)
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
        Example(ex.frozen_backbone, ex.digits, layer="backbone.1", note="frozen backbone, model.train()"),
    )
    valid = (
        Example(ex.frozen_backbone_kept_eval, ex.digits, note="train() override keeps frozen BatchNorm in eval"),
        Example(ex.deployed, ex.digits, note="inference-only: everything frozen, eval mode"),
        Example(ex.trained_mlp, ex.digits, note="nothing frozen"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        from bnaudit.probes.train_eval import frozen_bn_drift

        def probe() -> Any:
            batch = next(iter(audit_batches(ctx, limit=1)), None) if ctx.data is not None else None
            return frozen_bn_drift(ctx.model, batch, device=ctx.device, state=probe_state(ctx))

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


__all__ = [
    "FrozenBNDrifts",
    "StaleRunningStats",
    "TrainEvalGap",
    "UninitializedRunningStats",
]
