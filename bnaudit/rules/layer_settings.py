"""BN1xx, layer settings: how each normalization layer is built (momentum, running statistics, eps for its
dtype and its data, the axis it normalizes), read from the layers and the graph without training anything;
where normalization sits is in ``architecture``.

Each rule's docstring is its documentation (``bnaudit rules BN106``): what it checks, why, its options as
YAML, and a bad/good example. Each carries ``invalid`` cases that must fire and ``valid`` cases that must not
(``examples_architecture``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.findings import Finding
from bnaudit.graph import INPUT
from bnaudit.layers import is_batchnorm
from bnaudit.rules import examples_architecture as ex
from bnaudit.rules.base import Example, Rule, register
from bnaudit.rules.common import graph_batchnorms


def _batchnorms(ctx: RuleContext) -> Iterator[tuple[str, nn.Module]]:
    # A BatchNorm that never runs is BN112's alone: its constructor arguments change nothing.
    for name, m in ctx.model.named_modules():
        if name and is_batchnorm(m) and name not in ctx.unused:
            yield name, m


@register
class SuspiciousMomentum(Rule):
    """BatchNorm momentum above ``max_momentum`` (Keras's convention carried over) or exactly 0.

    PyTorch updates ``running = (1 - momentum) * running + momentum * batch``; Keras uses the complement
    (``momentum=0.99`` there means 0.01 here). A PyTorch momentum of 0.99 makes the running statistics almost
    exactly the last batch's, so eval outputs depend on whichever batch came last. Momentum 0 means the
    running statistics never move from their initial values (mean 0, variance 1). ``momentum=None`` (a
    cumulative average) is fine and not reported.

    Options:
        ```yaml
        max_momentum: 0.5
        ```

    Bad:
        nn.BatchNorm1d(64, momentum=0.99)
    Good:
        nn.BatchNorm1d(64, momentum=0.01)   # Keras momentum 0.99
    """

    code = "BN106"
    name = "suspicious-momentum"
    severity = "warning"
    summary = "BatchNorm momentum in Keras's convention (e.g. 0.99) or 0"
    fix = "use PyTorch's convention: momentum = 1 - keras_momentum (e.g. 0.01); the default is 0.1"
    requires = frozenset()
    options = {"max_momentum": float}
    defaults = {"max_momentum": 0.5}
    invalid = (
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.99), nn.ReLU(), nn.Linear(8, 2)), ex.x, layer="1"),
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.0), nn.ReLU(), nn.Linear(8, 2)), ex.x, layer="1"),
    )
    valid = (
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.01), nn.ReLU(), nn.Linear(8, 2)), ex.x),
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 2)), ex.x),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        limit = self.config["max_momentum"]
        for name, m in _batchnorms(ctx):
            mom = m.momentum
            if mom is None or not m.track_running_stats:
                continue
            if mom > limit:
                yield self.finding(
                    name,
                    f"{type(m).__name__} {name} has momentum={mom:g}: its running statistics are {mom:.0%} the latest batch "
                    f"(PyTorch's convention; Keras's {mom:g} is PyTorch's {1 - mom:.2g})",
                    {"momentum": mom, "max_momentum": limit, "pytorch_equivalent_of_keras": round(1 - mom, 6)},
                    fix=f"set momentum={1 - mom:.2g} on {name} (PyTorch momentum = 1 - Keras momentum)",
                )
            elif mom == 0:
                yield self.finding(
                    name,
                    f"{type(m).__name__} {name} has momentum=0: its running statistics never update from mean 0, variance 1",
                    {"momentum": mom},
                    fix=f"set momentum=0.1 (the default) on {name}, or None for a cumulative average",
                )


@register
class NoRunningStats(Rule):
    """A BatchNorm with ``track_running_stats=False``.

    Without running statistics the layer normalizes with the current batch's statistics in eval mode too: a
    sample's prediction depends on what else is in its batch, and a batch of one sample fails outright
    ("Expected more than 1 value per channel when training") or normalizes every value to beta.

    Options: none.

    Bad:
        nn.BatchNorm2d(64, track_running_stats=False)
    Good:
        nn.BatchNorm2d(64)                       # or nn.GroupNorm / nn.InstanceNorm2d if that was the intent
    """

    code = "BN107"
    name = "no-running-stats"
    severity = "warning"
    summary = "BatchNorm without running statistics makes inference batch-dependent"
    fix = "construct the BatchNorm with track_running_stats=True, or use GroupNorm if per-sample normalization was meant"
    requires = frozenset()
    invalid = (Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 2)), ex.x, layer="1"),)
    valid = (Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), ex.x),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        for name, m in _batchnorms(ctx):
            if not m.track_running_stats:
                yield self.finding(
                    name,
                    f"{name} keeps no running statistics: in eval mode it still normalizes with each batch's statistics",
                    {"track_running_stats": False},
                    fix=f"construct {name} with track_running_stats=True (then `bnaudit recalibrate` can fill its statistics)",
                )


@register
class EpsVsDtype(Rule):
    """A BatchNorm's ``eps`` too small for its half-precision (float16/bfloat16) parameters.

    ``eps`` bounds the gain ``1/sqrt(var + eps)`` for a channel whose variance collapses. In low precision a
    small variance flushes to zero sooner (float16's smallest normal number is 6.1e-5), and the amplified
    values overflow: with eps=1e-5 the gain is 316, so a deviation above 207 exceeds float16's maximum of
    65504. Mixed-precision practice uses eps around 1e-3 (Keras's default).

    Options:
        ```yaml
        min_eps: 0.001
        ```

    Bad:
        nn.BatchNorm2d(64, eps=1e-5).half()
    Good:
        nn.BatchNorm2d(64, eps=1e-3).half()      # or keep BatchNorm in float32 under autocast
    """

    code = "BN108"
    name = "eps-vs-dtype"
    severity = "warning"
    summary = "BatchNorm eps too small for float16/bfloat16 parameters"
    fix = "raise eps to 1e-3 for half-precision BatchNorm, or keep normalization layers in float32"
    requires = frozenset()
    options = {"min_eps": float}
    defaults = {"min_eps": 1e-3}
    invalid = (Example(lambda: ex.half_bn(1e-5), lambda: ex.x().to(torch.bfloat16), layer="1"),)
    valid = (
        Example(lambda: ex.half_bn(1e-3), lambda: ex.x().to(torch.bfloat16)),
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, eps=1e-5), nn.ReLU(), nn.Linear(8, 2)), ex.x,
                note="float32 is fine"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        limit = self.config["min_eps"]
        for name, m in _batchnorms(ctx):
            tensors = [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if t.is_floating_point()]
            if not tensors:
                continue
            dtype = tensors[0].dtype
            if dtype not in (torch.float16, torch.bfloat16) or m.eps >= limit:
                continue
            info = torch.finfo(dtype)
            gain = (1.0 / m.eps) ** 0.5
            underflows = float(torch.tensor(m.eps, dtype=dtype)) == 0.0
            yield self.finding(
                name,
                f"{name} is {str(dtype).replace('torch.', '')} with eps={m.eps:g}: a collapsed channel is scaled by "
                f"{gain:.0f}x (overflow past |x - mean| > {info.max / gain:.3g})"
                + ("; eps itself rounds to 0 in this dtype" if underflows else ""),
                {"eps": m.eps, "dtype": str(dtype), "min_eps": limit, "gain": gain, "dtype_max": float(info.max),
                 "dtype_smallest_normal": float(info.tiny), "eps_rounds_to_zero": underflows},
                severity="error" if underflows else None,
                fix=f"construct {name} with eps={limit:g} or keep it in float32",
            )


@register
class WrongAxis(Rule):
    """BatchNorm1d applied to ``(N, L, C)`` tokens: it normalizes axis 1, the sequence positions.

    ``nn.BatchNorm1d`` takes ``(N, C)`` or ``(N, C, L)``: channels on axis 1. A Linear or Embedding acting on
    ``(N, L, C)`` puts features on the last axis, so ``BatchNorm1d(L)`` after it computes a statistic per
    position, mixing all features, and fails on any other sequence length. The rule fires when the
    BatchNorm1d's 3-D input comes (without a transpose/permute) from a layer whose features are on the last
    axis. Any BatchNorm given a 3-D input normalizes its axis 1 the same way: a SyncBatchNorm (what
    ``convert_sync_batchnorm`` makes of a BatchNorm1d for DDP) is checked alike.

    Options: none.

    Bad:
        h = self.proj(tokens)          # (N, L, C)
        h = self.bn(h)                 # nn.BatchNorm1d(L)
    Good:
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)   # nn.BatchNorm1d(C), or nn.LayerNorm(C)
    """

    code = "BN109"
    name = "wrong-axis"
    severity = "error"
    summary = "BatchNorm1d normalizing the sequence axis of (N, L, C) input"
    fix = "transpose to (N, C, L) around BatchNorm1d(C) (x.transpose(1, 2)), or use nn.LayerNorm(C) per token"
    requires = frozenset({"graph", "shapes"})
    invalid = (Example(lambda: ex.TokenMLP(transpose=False), ex.tokens, layer="bn"),)
    valid = (Example(lambda: ex.TokenMLP(transpose=True), ex.tokens),)

    _AXIS_OPS = frozenset({"transpose", "permute", "swapaxes", "movedim", "swapdims", "t", "mT"})

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        g = ctx.graph
        for node in graph_batchnorms(ctx):
            if not node.input_shapes:  # BatchNorm2d/3d refuse 3-D input; any other BatchNorm normalizes axis 1
                continue
            shape = node.input_shapes[0]
            if len(shape) != 3:
                continue
            for e in g.parents(node.name):
                if e.src == INPUT or set(e.via) & self._AXIS_OPS:
                    continue
                src = g.module(e.src)
                last = getattr(src, "out_features", None) or getattr(src, "embedding_dim", None)
                if isinstance(src, (nn.Linear, nn.Embedding)) and last == shape[-1]:
                    yield self.finding(
                        node.name,
                        f"{node.name} gets {tuple(shape)} from {e.src} ({type(src).__name__}, {last} features on the "
                        f"last axis) and normalizes axis 1 (size {shape[1]}): statistics per position, not per feature",
                        {"input_shape": list(shape), "num_features": node.module.num_features, "producer": e.src,
                         "producer_features": last},
                    )
                    break


def _median_input_var(history, name: str) -> tuple[float, int] | None:
    """The median over channels of the layer's input variance (per channel: the mean over recorded steps of
    the batch variance, what train-mode BatchNorm divides by), and how many steps it came from."""
    import numpy as np

    if history is None or name not in history.info:
        return None
    cv = history.series(name, "channel_var")
    ok = np.isfinite(cv).all(axis=1) if cv.ndim == 2 and cv.shape[1] else np.zeros(len(cv), bool)
    if not ok.any():
        return None
    return float(np.median(cv[ok].mean(axis=0))), int(ok.sum())


@register
class EpsTooLarge(Rule):
    """A BatchNorm whose ``eps`` is at least ``max_eps``: a number meant for something else passed as eps.

    The signature is ``BatchNorm2d(num_features, eps=1e-5, momentum=0.1, ...)``: the second positional
    argument is ``eps``, not momentum. ``nn.BatchNorm2d(128, 0.8)`` is Keras's
    ``BatchNormalization(momentum=0.8)`` ported positionally (eriklindernoren/PyTorch-GAN's GAN and DCGAN,
    upstream issue 116), and ``nn.BatchNorm2d(n5x5, n5x5)`` passes a channel count (weiaicunzai/pytorch-cifar100's
    GoogLeNet, issue 96). The layer divides by ``sqrt(var + eps)``: with eps comparable to the variance of its
    input it barely normalizes scale (on those GAN scripts eps was 1.8x to 17,600x the input variance). Small
    deliberate values such as Keras's and timm's EfficientNets' 1e-3 are fine.

    Static: fires on ``eps >= max_eps``. With ``--data`` (or a recorded history) the evidence adds the median
    per-channel variance of the layer's input and ``eps_to_var``, eps divided by it; the message gives the
    factor where eps exceeds ``max_eps_to_var`` of that variance.

    Options:
        ```yaml
        max_eps: 0.01          # eps at or above this is reported
        max_eps_to_var: 0.1    # with data: eps above this share of the median input variance is quantified
        ```

    Bad:
        nn.BatchNorm1d(256, 0.8)              # eps = 0.8; Keras's momentum=0.8 was meant
    Good:
        nn.BatchNorm1d(256, momentum=0.2)     # PyTorch momentum = 1 - Keras momentum; eps stays 1e-5
    """

    code = "BN111"
    name = "eps-too-large"
    severity = "warning"
    summary = "BatchNorm eps so large it was probably meant as momentum (the 2nd positional argument is eps)"
    fix = ("pass momentum by keyword: nn.BatchNorm2d(128, momentum=0.2) for a Keras port of momentum=0.8 "
           "(PyTorch momentum = 1 - Keras's), or drop the argument for the default eps=1e-5")
    requires = frozenset()
    options = {"max_eps": float, "max_eps_to_var": float}
    defaults = {"max_eps": 1e-2, "max_eps_to_var": 0.1}
    invalid = (
        Example(ex.GanGenerator, lambda: ex.x(10, 32), layer="model.3",
                note="the GAN generator block Linear -> BatchNorm1d(n, 0.8) -> LeakyReLU"),
        Example(lambda: ex.mlp(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, 4), nn.ReLU()), ex.img, layer="1",
                note="a channel count passed as eps: BatchNorm2d(n5x5, n5x5)"),
    )
    valid = (
        Example(lambda: ex.GanGenerator(keras_port=False), lambda: ex.x(10, 32),
                note="the same generator with momentum=0.2 by keyword: only the eps differs"),
        Example(ex.efficientnet_block, ex.img, note="eps=1e-3, timm's EfficientNets"),
        Example(lambda: ex.GanGenerator(eps=0.8), lambda: ex.x(10, 32), options={"max_eps": 1.0},
                note="eps=0.8 below a raised max_eps"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        limit, share = self.config["max_eps"], self.config["max_eps_to_var"]
        for name, m in _batchnorms(ctx):
            eps = m.eps
            if not eps >= limit:
                continue
            kind, c = type(m).__name__, getattr(m, "num_features", "C")
            ev: dict = {"eps": eps, "max_eps": limit, "default_eps": 1e-5}
            message = (f"{kind} {name} has eps={eps:g}: the second positional argument of {kind} is eps, not "
                       f"momentum, so `{kind}({c}, {eps:g})` divides by sqrt(var + {eps:g})")
            measured = self._measure(ctx, name)
            if measured is not None:
                var, steps, source = measured
                ev.update(median_input_var=var, variance_source=source, variance_steps=steps,
                          max_eps_to_var=share, eps_to_var=(eps / var) if var > 0 else float("inf"))
                if var <= 0:
                    message += "; its input has zero variance on this data"
                elif eps > share * var:
                    message += (f"; eps is {eps / var:.3g}x the median per-channel variance of its input "
                                f"({var:.3g}, {source}), so it barely normalizes scale")
                else:
                    message += (f"; on this data eps is only {eps / var:.2%} of the median input variance "
                                f"({var:.3g}), but the argument was probably meant as momentum")
            if 0.5 <= eps < 1:
                fix = (f"write nn.{kind}({c}, momentum={1 - eps:.2g}) if {eps:g} was Keras's momentum (PyTorch "
                       "momentum = 1 - Keras's), or drop the argument for the default eps=1e-5")
            else:
                fix = (f"construct {name} with the default eps (nn.{kind}({c})) or pass eps by keyword with the "
                       "value meant; a second positional argument is always eps")
            yield self.finding(name, message, ev, fix=fix)

    @staticmethod
    def _measure(ctx: RuleContext, name: str) -> tuple[float, int, str] | None:
        """The median input variance from the data probe (``--data``), else from the recorded history."""
        if ctx.data is not None:
            from bnaudit.probes.data import data_probe

            got = _median_input_var(data_probe(ctx).history, name)
            if got is not None:
                return (*got, "data")
        history = getattr(ctx.history, "history", ctx.history)
        got = _median_input_var(history, name) if history is not None else None
        return (*got, "history") if got is not None else None
