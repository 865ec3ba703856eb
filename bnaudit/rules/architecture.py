"""BN1xx: how normalization is wired, read from the layer graph without training anything.

Each rule's docstring is its documentation (``bnaudit rules BN101``): what it checks, why, its options as
YAML, and a bad/good example. Each carries ``invalid`` cases that must fire and ``valid`` cases that must not."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.findings import Finding
from bnaudit.graph import INPUT, OUTPUT, Node
from bnaudit.layers import (
    ACTIVATION_FUNCTIONS,
    DROPOUT_FUNCTIONS,
    RESHAPE_FUNCTIONS,
    has_bias,
    is_activation,
    is_batchnorm,
    is_dropout,
    is_norm,
    is_weight_layer,
)
from bnaudit.rules.base import Example, Rule, register

# --- example factories (small, seeded, shared by the rules' cases) ------------------------------------------


def _x(features: int = 10, n: int = 16) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(0))


def _img(channels: int = 3, n: int = 8, size: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def _mlp(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers)


class _TokenMLP(nn.Module):
    """Linear on (N, L, C) tokens, then BatchNorm1d(L): normalizes across positions, not features."""

    def __init__(self, transpose: bool = False) -> None:
        super().__init__()
        self.transpose = transpose
        self.proj = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16 if transpose else 6)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (N, L=6, C=16)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2) if self.transpose else self.bn(h)
        return self.head(h.mean(1))


def _tokens() -> torch.Tensor:
    return torch.randn(8, 6, 12, generator=torch.Generator().manual_seed(0))


class _SharedBN(nn.Module):
    """One BatchNorm applied at every step of a loop (as in a hand-written RNN)."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.cell = nn.Linear(10, 10, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm1d(10) for _ in range(1 if shared else 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for t in range(3):
            h = torch.tanh(self.bns[0 if len(self.bns) == 1 else t](self.cell(h)))
        return h


class _BiasTo(nn.Module):
    """A Linear feeding a BatchNorm, plus a residual add of its output or a functional relu in between."""

    def __init__(self, residual: bool = False, activation: bool = False, flatten: bool = False) -> None:
        super().__init__()
        self.residual, self.activation, self.flatten = residual, activation, flatten
        self.fc = nn.Linear(10, 10)
        self.bn = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation:
            out = self.bn(torch.nn.functional.relu(h))
        elif self.flatten:
            out = self.bn(h.flatten(1))
        else:
            out = self.bn(h)
        if self.residual:
            out = out + h  # the bias also reaches the output through the skip: it is not cancelled
        return self.head(out)


def _half_bn(eps: float) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, eps=eps), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)


# --- helpers ---------------------------------------------------------------------------------------------------


def _batchnorms(ctx: RuleContext) -> Iterator[tuple[str, nn.Module]]:
    for name, m in ctx.model.named_modules():
        if name and is_batchnorm(m):
            yield name, m


def _graph_batchnorms(ctx: RuleContext) -> Iterator[Node]:
    for node in ctx.graph.nodes.values():
        if is_batchnorm(node.module):
            yield node


# --- rules -----------------------------------------------------------------------------------------------------


@register
class RedundantBias(Rule):
    """Linear/Conv with ``bias=True`` whose output goes straight into a BatchNorm.

    BatchNorm subtracts the per-channel batch mean (in eval, the running mean), so any constant added per
    channel by the preceding layer's bias is removed again: the bias receives exactly zero gradient through
    the BatchNorm and only wastes parameters and weight decay. BatchNorm's own ``beta`` is the shift (Ioffe &
    Szegedy 2015, section 3.2: "the bias b can be ignored since its effect will be canceled by the subsequent
    mean subtraction").

    The rule fires only when every consumer of the layer is a BatchNorm reached through pure reshapes
    (view, flatten, ...), so a bias that also feeds a residual branch or a head is left alone.

    Options: none.

    Bad:
        nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
    Good:
        nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    """

    code = "BN101"
    name = "redundant-bias"
    severity = "warning"
    summary = "Linear/Conv bias feeding a BatchNorm is cancelled by its mean subtraction"
    fix = "construct the layer with bias=False; the BatchNorm's beta already provides the shift"
    invalid = (
        Example(lambda: _mlp(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), _x, layer="0"),
        Example(lambda: _mlp(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), _img, layer="0"),
        Example(lambda: _BiasTo(flatten=True), _x, layer="fc", note="a flatten between them is a pure reshape"),
    )
    valid = (
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), _x),
        Example(lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), _x,
                note="an activation between them: the bias matters"),
        Example(lambda: _BiasTo(activation=True), _x,
                note="F.relu in forward between them: an edge straight to the BatchNorm, but not a pure reshape"),
        Example(lambda: _BiasTo(residual=True), _x,
                note="the output also feeds a residual add: not every consumer is the BatchNorm"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        g = ctx.graph
        for name, node in g.nodes.items():
            if not is_weight_layer(node.module) or not has_bias(node.module):
                continue
            consumers = g.children(name)
            if not consumers:
                continue
            if all(
                e.dst in g.nodes and is_batchnorm(g.nodes[e.dst].module) and set(e.via) <= RESHAPE_FUNCTIONS
                for e in consumers
            ):
                bns = sorted({e.dst for e in consumers})
                yield self.finding(
                    name,
                    f"{node.type} {name} has a bias of {node.module.bias.numel()} values that "
                    f"{' and '.join(f'{g.nodes[b].type} {b}' for b in bns)} subtracts away again",
                    {"bias_values": node.module.bias.numel(), "feeds": bns},
                    fix=f"construct {name} with bias=False; the BatchNorm's beta already provides the shift",
                )


@register
class BNAfterActivation(Rule):
    """A BatchNorm placed after the activation, where the configured placement policy says before.

    Ioffe & Szegedy (2015) normalize ``x = Wu`` before the nonlinearity, "since it is likely to have a
    symmetric, non-sparse distribution"; the seeds teach the same order (Linear -> BatchNorm -> ReLU). Both
    orders are used in practice, so this is information, and the policy is configurable.

    Options:
        ```yaml
        placement: before-activation   # before-activation | after-activation | any
        ```

    Bad (with the default policy):
        nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8))
    Good:
        nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
    """

    code = "BN102"
    name = "bn-after-activation"
    severity = "info"
    summary = "BatchNorm placed on the other side of the activation than the placement policy says"
    fix = "move the BatchNorm between the Linear/Conv and its activation (Linear -> BatchNorm -> ReLU)"
    options = {"placement": str}
    defaults = {"placement": "before-activation"}
    choices = {"placement": ("before-activation", "after-activation", "any")}
    invalid = (
        Example(lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), _x, layer="2"),
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), _x,
                options={"placement": "after-activation"}, layer="1"),
    )
    valid = (
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), _x),
        Example(lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), _x,
                options={"placement": "any"}),
        Example(lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), _x,
                options={"placement": "after-activation"}, note="after the activation, as that policy asks"),
    )

    @staticmethod
    def _activation_between(ctx: RuleContext, src: str, via: tuple[str, ...]) -> bool:
        mod = ctx.graph.module(src)
        return (mod is not None and is_activation(mod)) or bool(set(via) & ACTIVATION_FUNCTIONS)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        policy = self.config["placement"]
        if policy == "any":
            return
        g = ctx.graph
        for node in _graph_batchnorms(ctx):
            if policy == "before-activation":
                acts = [e for e in g.parents(node.name) if self._activation_between(ctx, e.src, e.via)]
                if acts:
                    src_module = g.module(acts[0].src)
                    if src_module is not None and is_activation(src_module):
                        what = type(src_module).__name__
                    else:
                        what = "F." + sorted(set(acts[0].via) & ACTIVATION_FUNCTIONS)[0]
                    yield self.finding(
                        node.name,
                        f"{node.name} normalizes the output of an activation ({what}); the placement policy is "
                        "before the activation",
                        {"placement": "after-activation", "policy": policy, "activation": what},
                    )
            else:
                outs = [e for e in g.children(node.name) if e.dst in g.nodes and is_activation(g.nodes[e.dst].module)]
                outs += [e for e in g.children(node.name) if set(e.via) & ACTIVATION_FUNCTIONS]
                if outs:
                    yield self.finding(
                        node.name,
                        f"{node.name} feeds an activation; the placement policy is after the activation",
                        {"placement": "before-activation", "policy": policy},
                        fix="move the BatchNorm after the activation (Linear -> ReLU -> BatchNorm), or set the "
                        "policy to before-activation or any",
                    )


def _parameter_free(node: Node) -> bool:
    return not is_batchnorm(node.module) and not any(True for _ in node.module.parameters(recurse=False))


@register
class NormOnOutput(Rule):
    """A BatchNorm whose output is the model's output (only parameter-free layers after it).

    BatchNorm belongs to hidden layers (the seeds: "typically applied to the hidden layers ... but not to the
    output layer"). On the output it forces every batch of predictions to zero mean and unit variance per
    unit (in train mode) and makes logits or regression outputs depend on the running statistics, so targets
    with another scale can never be fitted exactly.

    Options: none.

    Bad:
        nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2))
    Good:
        nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    """

    code = "BN103"
    name = "norm-on-output"
    severity = "warning"
    summary = "BatchNorm on the model's final output"
    fix = "remove the BatchNorm after the output layer; normalize hidden layers only"
    invalid = (
        Example(lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2)), _x, layer="3"),
        Example(lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2), nn.Softmax(dim=1)), _x,
                layer="3", note="a softmax after it does not help"),
    )
    valid = (Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), _x),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        g = ctx.graph
        seen: set[str] = set()
        stack = [e.src for e in g.parents(OUTPUT)]
        while stack:
            name = stack.pop()
            if name in seen or name not in g.nodes:
                continue
            seen.add(name)
            node = g.nodes[name]
            if is_batchnorm(node.module):
                yield self.finding(
                    name,
                    f"{name} ({node.type}) normalizes the model's output",
                    {"output_shape": list(node.output_shapes[0]) if node.output_shapes else None},
                    fix=f"remove {name}; the output layer should be the last Linear/Conv",
                )
            elif _parameter_free(node):
                stack.extend(e.src for e in g.parents(name))


@register
class DropoutBeforeBN(Rule):
    """Dropout upstream of a BatchNorm, with no other normalization between them.

    In training, Dropout scales surviving activations by 1/(1-p), which changes the variance the BatchNorm
    sees; at inference Dropout is off, so the variance differs from the running statistics the BatchNorm
    stored: a "variance shift" that hurts test accuracy (Li, Chen, Hu & Yang, "Understanding the Disharmony
    between Dropout and Batch Normalization by Variance Shift", CVPR 2019). The seeds' own "after BN" MLP
    (Linear, BN, ReLU, Dropout, Linear, BN, ...) has this pattern.

    Options: none.

    Bad:
        Linear -> BatchNorm1d -> ReLU -> Dropout(0.3) -> Linear -> BatchNorm1d -> ReLU -> Linear
    Good:
        Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d -> ReLU -> Dropout(0.3) -> Linear
    """

    code = "BN104"
    name = "dropout-before-bn"
    severity = "warning"
    summary = "Dropout before a BatchNorm causes a train/eval variance shift"
    fix = "move Dropout after the last BatchNorm (e.g. just before the output layer), or remove it"
    invalid = (
        Example(
            lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
            _x, layer="5",
        ),
    )
    valid = (
        Example(
            lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)),
            _x,
        ),
        Example(lambda: _mlp(nn.Dropout(0.0), nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2)), _x,
                note="p=0 changes nothing"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        g = ctx.graph
        for node in _graph_batchnorms(ctx):
            hits = []
            for e in g.parents(node.name):
                if set(e.via) & DROPOUT_FUNCTIONS:
                    hits.append((f"F.{next(iter(set(e.via) & DROPOUT_FUNCTIONS))}", None, ()))
            for src, path in g.upstream(node.name, through=lambda n: not is_norm(n.module)):
                m = g.nodes[src].module
                if is_dropout(m) and float(getattr(m, "p", 0.0)) > 0:
                    hits.append((src, float(m.p), path))
            if hits:
                src, p, path = hits[0] if hits[0][1] is not None or len(hits) == 1 else hits[1]
                yield self.finding(
                    node.name,
                    f"{src}{f' (p={p:g})' if p is not None else ''} feeds {node.name}"
                    f"{' through ' + ', '.join(reversed(path)) if path else ''}: its train-time variance differs "
                    "from eval, so the running statistics will not match inference",
                    {"dropout": src, "p": p, "path": list(reversed(path))},
                    fix=f"move {src} after the last BatchNorm (just before the output layer), or remove it",
                )


@register
class BNReused(Rule):
    """One BatchNorm module called more than once per forward pass.

    A BatchNorm shared across time steps or branches mixes their statistics into one running mean and
    variance, although the steps have different distributions (Cooijmans et al. 2017, "Recurrent Batch
    Normalization", keep separate statistics per time step). The running statistics are also updated once per
    call, so its momentum acts several times per training step.

    Options: none.

    Bad:
        for t in range(T): h = torch.tanh(self.bn(self.cell(h)))
    Good:
        a BatchNorm per step (nn.ModuleList), or nn.LayerNorm, which has no batch statistics
    """

    code = "BN105"
    name = "bn-reused"
    severity = "warning"
    summary = "one BatchNorm module called several times per forward"
    fix = "give each call site or time step its own BatchNorm, or use nn.LayerNorm"
    invalid = (Example(lambda: _SharedBN(shared=True), _x, layer="bns.0"),)
    valid = (Example(lambda: _SharedBN(shared=False), _x),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        for node in _graph_batchnorms(ctx):
            if node.calls > 1:
                yield self.finding(
                    node.name,
                    f"{node.name} is called {node.calls} times per forward; its running statistics mix all calls",
                    {"calls": node.calls},
                )


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
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.99), nn.ReLU(), nn.Linear(8, 2)), _x, layer="1"),
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.0), nn.ReLU(), nn.Linear(8, 2)), _x, layer="1"),
    )
    valid = (
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.01), nn.ReLU(), nn.Linear(8, 2)), _x),
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 2)), _x),
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
    invalid = (Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 2)), _x, layer="1"),)
    valid = (Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), _x),)

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
    invalid = (Example(lambda: _half_bn(1e-5), lambda: _x().to(torch.bfloat16), layer="1"),)
    valid = (
        Example(lambda: _half_bn(1e-3), lambda: _x().to(torch.bfloat16)),
        Example(lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, eps=1e-5), nn.ReLU(), nn.Linear(8, 2)), _x,
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
    axis.

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
    invalid = (Example(lambda: _TokenMLP(transpose=False), _tokens, layer="bn"),)
    valid = (Example(lambda: _TokenMLP(transpose=True), _tokens),)

    _AXIS_OPS = frozenset({"transpose", "permute", "swapaxes", "movedim", "swapdims", "t", "mT"})

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        g = ctx.graph
        for node in _graph_batchnorms(ctx):
            if not isinstance(node.module, nn.BatchNorm1d) or not node.input_shapes:
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


@register
class NoNormalization(Rule):
    """A network with at least ``min_hidden_layers`` hidden Linear/Conv layers and no normalization layer.

    Deep, unnormalized networks are where the seeds say BatchNorm "becomes essential": it allows higher
    learning rates, converges faster and depends less on initialization (Ioffe & Szegedy 2015). This is a
    suggestion; measure it with ``bnaudit train-compare``.

    Options:
        ```yaml
        min_hidden_layers: 4
        ```

    Bad:
        five Linear layers with ReLUs between them and nothing else
    Good:
        Linear -> BatchNorm1d -> ReLU blocks (``bnaudit insert-bn`` writes them)
    """

    code = "BN110"
    name = "no-normalization"
    severity = "info"
    summary = "deep network without any normalization layer"
    fix = "try `bnaudit insert-bn MODEL -o model_bn.pt`, then `bnaudit train-compare` to measure the difference"
    requires = frozenset()
    options = {"min_hidden_layers": int}
    defaults = {"min_hidden_layers": 4}
    invalid = (
        Example(lambda: _mlp(*[m for _ in range(4) for m in (nn.Linear(10, 10), nn.ReLU())], nn.Linear(10, 2)), _x),
    )
    valid = (
        Example(lambda: _mlp(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)), _x, note="shallow"),
        Example(lambda: _mlp(*[m for _ in range(4) for m in (nn.Linear(10, 10, bias=False), nn.BatchNorm1d(10), nn.ReLU())], nn.Linear(10, 2)), _x),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        modules = [m for name, m in ctx.model.named_modules() if name]
        if any(is_norm(m) for m in modules):
            return
        weight_layers = [m for m in modules if is_weight_layer(m)]
        hidden = max(len(weight_layers) - 1, 0)
        limit = self.config["min_hidden_layers"]
        if hidden >= limit:
            yield self.finding(
                None,
                f"{hidden} hidden Linear/Conv layers and no normalization layer",
                {"hidden_layers": hidden, "min_hidden_layers": limit},
                fix=f"try `bnaudit insert-bn {ctx.source} -o model_bn.pt`, then `bnaudit train-compare` to measure it",
            )
