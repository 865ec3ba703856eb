"""BN1xx: how normalization is wired, read from the layer graph without training anything.

Each rule's docstring is its documentation (``bnaudit rules BN101``): what it checks, why, its options as
YAML, and a bad/good example. Each carries ``invalid`` cases that must fire and ``valid`` cases that must not."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.findings import Finding
from bnaudit.graph import INPUT, OUTPUT, Node
from bnaudit.layers import (
    ACTIVATION_FUNCTIONS,
    DROPOUT_FUNCTIONS,
    NORM_FUNCTIONS,
    RESHAPE_FUNCTIONS,
    SOFTMAX_FUNCTIONS,
    SOFTMAXES,
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


class _RmsNorm(nn.Module):
    """RMS normalization over the last axis as a third-party library writes it (timm's RmsNorm): not a torch
    class, known by its name."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _BatchVarianceScale(nn.Module):
    """An EvoNorm-B0-like layer under another name: divides by the batch standard deviation in training and
    by a running one in eval mode; known as a normalization layer by its ``running_var`` buffer."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-3) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_var.lerp_(var, self.momentum)
        else:
            var = self.running_var
        return x / (var + self.eps).sqrt() * self.weight + self.bias


class _NormedBlock(nn.Module):
    """A block that normalizes inside its own forward (``F.layer_norm``), as attention blocks often do: not a
    normalization layer itself, since it holds a Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(self.fc(x), (self.dim,))


class _TwoBranches(nn.Module):
    """One Dropout feeding two branches, each with its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(10, 8)
        self.drop = nn.Dropout(0.3)
        self.a, self.bn_a = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)
        self.b, self.bn_b = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.stem(x)))
        return self.head(torch.cat([torch.relu(self.bn_a(self.a(h))), torch.relu(self.bn_b(self.b(h)))], dim=1))


class _BiasedAttention(nn.Module):
    """Token mixing by attention whose logits get a learned bias from a small MLP with dropout (MaxViT's and
    CoAtNet's relative-position MLP), then a BatchNorm over the features of the mixed tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(12, 36)
        self.bias_mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.125), nn.Linear(8, 1))
        self.register_buffer("distance", (torch.arange(6.0)[:, None] - torch.arange(6.0)[None, :]).abs()[..., None])
        self.proj = nn.Linear(12, 12, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(1, 2) + self.bias_mlp(self.distance).squeeze(-1)).softmax(dim=-1)
        h = self.proj(attn @ v)  # (N, L, C)
        return self.head(torch.relu(self.bn(h.transpose(1, 2))).mean(2))


def _deep(norm: type[nn.Module] | None) -> nn.Module:
    """Four hidden Linear layers with ReLUs, each normalized by ``norm`` when given."""
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(10, 10, bias=norm is None), *([norm(10)] if norm else []), nn.ReLU()]
    return _mlp(*layers, nn.Linear(10, 2))


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


# What a dropout's variance shift does not survive on its way to a BatchNorm (BN104).
_RESCALING = NORM_FUNCTIONS | SOFTMAX_FUNCTIONS


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _batchnorms(ctx: RuleContext) -> Iterator[tuple[str, nn.Module]]:
    # A BatchNorm that never runs is BN112's alone: its constructor arguments change nothing.
    for name, m in ctx.model.named_modules():
        if name and is_batchnorm(m) and name not in ctx.unused:
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

    Fires once per Dropout (p > 0) whose output reaches a BatchNorm. Its output is followed forwards through
    every layer that is not a normalization layer, and each path stops at the first normalization on it:
    torch's classes, a third-party one (timm's LayerNorm2d, RmsNorm2d, EvoNorm; see BN110), a normalization
    computed inside a block's forward (``F.layer_norm``, ``F.group_norm``...), or a softmax (``nn.Softmax``,
    ``F.softmax``, and the one inside ``F.scaled_dot_product_attention``), which divides by its own sum. Each
    re-estimates the scale, so the variance shift does not survive it: a dropout in an attention block's
    relative-position MLP (MaxViT, CoAtNet) reaches later BatchNorms only as attention weights, and says
    nothing about their statistics. (A dropout on the values of ``F.scaled_dot_product_attention`` would pass
    the call linearly; it is missed.) The finding names the Dropout and lists every BatchNorm it reaches,
    with the path to the nearest. A dropout called as a function (``F.dropout``) has no module to name: it
    is reported at the BatchNorm it feeds directly.

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
            _x, layer="3",
        ),
        Example(_TwoBranches, _x, layer="drop", note="one Dropout feeding two BatchNorms: one finding"),
    )
    valid = (
        Example(
            lambda: _mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)),
            _x,
        ),
        Example(lambda: _mlp(nn.Dropout(0.0), nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2)), _x,
                note="p=0 changes nothing"),
        Example(
            lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.3), _NormedBlock(8), nn.Linear(8, 8, bias=False),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
            _x, note="F.layer_norm inside a block's forward between them",
        ),
        Example(
            lambda: _mlp(nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 8), _RmsNorm(8),
                         nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
            _x, note="a third-party RmsNorm between them",
        ),
        Example(_BiasedAttention, _tokens, note="a dropout in an attention bias MLP reaches the BatchNorm as weights"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        g = ctx.graph
        order = {name: i for i, name in enumerate(g.nodes)}
        for name, node in g.nodes.items():
            m = node.module
            if not is_dropout(m) or float(getattr(m, "p", 0.0)) <= 0:
                continue
            reached = [
                (dst, path)
                for dst, path in g.downstream(
                    name,
                    through=lambda n: not (is_norm(n.module) or isinstance(n.module, SOFTMAXES)),
                    follow=lambda e: not set(e.via) & _RESCALING,
                )
                if is_batchnorm(g.nodes[dst].module)
            ]
            if not reached:
                continue
            nearest, path = reached[0]
            bns = sorted((dst for dst, _ in reached), key=order.__getitem__)
            p = float(m.p)
            through = f" through {', '.join(path)}" if path else ""
            feeds = (
                f"feeds {nearest}{through}"
                if len(bns) == 1
                else f"feeds {len(bns)} BatchNorm layers with no normalization between ({_names(bns)}; the nearest, "
                f"{nearest}{through})"
            )
            yield self.finding(
                name,
                f"{name} (p={p:g}) {feeds}: its train-time variance differs from eval, so the running statistics "
                "will not match inference",
                {"dropout": name, "p": p, "batchnorms": bns, "path": list(path)},
                fix=f"move {name} after the last BatchNorm it feeds (just before the output layer), or remove it",
            )
        for node in _graph_batchnorms(ctx):
            ops = sorted({op for e in g.parents(node.name) for op in e.via if op in DROPOUT_FUNCTIONS})
            if ops:
                yield self.finding(
                    node.name,
                    f"F.{ops[0]} feeds {node.name} directly: its train-time variance differs from eval, so the "
                    "running statistics will not match inference",
                    {"dropout": f"F.{ops[0]}", "p": None, "batchnorms": [node.name], "path": []},
                    fix=f"move the F.{ops[0]} call after {node.name}'s last use (just before the output layer), "
                    "or remove it",
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

    Normalization layers are torch's (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm,
    LocalResponseNorm) and any other class named like one (timm's RmsNorm2d, LayerNorm2d, EvoNorm2dB0/S0,
    FilterResponseNormTlu2d; FrozenBatchNorm2d) or keeping running statistics (``running_mean`` or
    ``running_var`` buffers); a module holding a Linear/Conv is not one, whatever its name.

    Deep, unnormalized networks are where the seeds say BatchNorm "becomes essential": it allows higher
    learning rates, converges faster and depends less on initialization (Ioffe & Szegedy 2015). This is a
    suggestion; measure it with ``bnaudit train-compare``. A normalization layer that is registered but
    never called (BN112) does not count: the network it sits in is unnormalized.

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
    invalid = (Example(lambda: _deep(None), _x),)
    valid = (
        Example(lambda: _mlp(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)), _x, note="shallow"),
        Example(lambda: _deep(nn.BatchNorm1d), _x),
        Example(lambda: _deep(_RmsNorm), _x, note="a third-party RmsNorm, known by its class name"),
        Example(lambda: _deep(_BatchVarianceScale), _x, note="a normalization layer known by its running_var"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        modules = [m for name, m in ctx.model.named_modules() if name]
        if any(is_norm(m) for name, m in ctx.model.named_modules() if name and name not in ctx.unused):
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


# --- BN111 / BN112 (issue 19): a positional eps, and a normalization layer that never runs -------------------


class _GanGenerator(nn.Module):
    """The MLP generator of eriklindernoren/PyTorch-GAN's gan.py, shrunk: ``BatchNorm1d(out_feat, 0.8)`` is
    Keras's ``BatchNormalization(momentum=0.8)`` ported positionally, so 0.8 lands on eps."""

    def __init__(self, latent: int = 10, keras_port: bool = True, eps: float | None = None) -> None:
        super().__init__()

        def block(in_feat: int, out_feat: int, normalize: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(in_feat, out_feat)]
            if normalize:
                if eps is not None:
                    layers.append(nn.BatchNorm1d(out_feat, eps=eps))
                elif keras_port:
                    layers.append(nn.BatchNorm1d(out_feat, 0.8))
                else:
                    layers.append(nn.BatchNorm1d(out_feat, momentum=0.2))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(
            *block(latent, 16, normalize=False), *block(16, 32), nn.Linear(32, 8), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


def _efficientnet_block(eps: float = 1e-3) -> nn.Module:
    # timm's EfficientNets: Conv -> BatchNorm2d(eps=1e-3) -> SiLU (Keras's default eps, on purpose).
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=eps), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


class _MorvanNet(nn.Module):
    """MorvanZhou's BatchNorm tutorial net (tutorial-contents/504_batch_normalization.py), shrunk: both the
    "with BN" and "without BN" nets build ``bn_input``; only the first calls it."""

    def __init__(self, do_bn: bool = False, hidden: int = 5) -> None:
        super().__init__()
        self.do_bn = do_bn
        self.bn_input = nn.BatchNorm1d(1, momentum=0.5)
        self.fcs = []
        for i in range(hidden):
            fc = nn.Linear(1 if i == 0 else 10, 10)
            setattr(self, f"fc{i}", fc)
            self.fcs.append(fc)
        self.predict = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.do_bn:
            x = self.bn_input(x)
        for fc in self.fcs:
            x = torch.tanh(fc(x))
        return self.predict(x)


class _BranchBN(nn.Module):
    """Normalizes only when the batch is not constant: a data-dependent branch (fx cannot trace it), taken on
    any real input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.std() > 0:
            h = self.bn(h)
        return self.head(torch.relu(h))


def _scalar_x() -> torch.Tensor:
    return torch.randn(64, 1, generator=torch.Generator().manual_seed(0))


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
        Example(_GanGenerator, lambda: _x(10, 32), layer="model.3",
                note="the GAN generator block Linear -> BatchNorm1d(n, 0.8) -> LeakyReLU"),
        Example(lambda: _mlp(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, 4), nn.ReLU()), _img, layer="1",
                note="a channel count passed as eps: BatchNorm2d(n5x5, n5x5)"),
    )
    valid = (
        Example(lambda: _GanGenerator(keras_port=False), lambda: _x(10, 32),
                note="the same generator with momentum=0.2 by keyword: only the eps differs"),
        Example(_efficientnet_block, _img, note="eps=1e-3, timm's EfficientNets"),
        Example(lambda: _GanGenerator(eps=0.8), lambda: _x(10, 32), options={"max_eps": 1.0},
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


@register
class UnusedNormalization(Rule):
    """A normalization layer that is registered on the model but never called in its forward pass.

    MorvanZhou's widely read BatchNorm tutorial builds a "with BN" and a "without BN" net; the "without BN" one
    still creates ``self.bn_input`` and never calls it. Its parameters sit in the optimizer without gradients,
    its buffers stay at their initial values, and a reader (or an audit that counts modules) believes the net
    is normalized. Usually a forgotten call in ``forward()`` or a leftover of an experiment.

    Decided from the layer graph: the layer is neither in the fx trace nor called in the forward pass on the
    example input, and, when a history was recorded, it was called in none of the recorded steps. A layer
    behind a branch that the example input takes is called and not reported. Every other rule treats the
    layer as absent (BN110 counts the network as unnormalized), and the graph, ``insert-bn`` and the probes
    skip it. The report's ``source_lines`` point at the line that creates it.

    Options: none.

    Bad:
        self.bn_input = nn.BatchNorm1d(1)              # in __init__
        def forward(self, x): return self.net(x)       # bn_input never called
    Good:
        def forward(self, x): return self.net(self.bn_input(x))   # or delete bn_input
    """

    code = "BN112"
    name = "unused-normalization"
    severity = "info"
    summary = "normalization layer registered but never called in the forward pass"
    fix = "call the layer in forward() where it was meant to normalize, or delete it"
    invalid = (Example(_MorvanNet, _scalar_x, layer="bn_input", note='the tutorial\'s "without BN" net'),)
    valid = (
        Example(lambda: _MorvanNet(do_bn=True), _scalar_x, note='the "with BN" net: only the call differs'),
        Example(_BranchBN, _x, note="called in a branch the example input takes"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        named = dict(ctx.model.named_modules())
        history = getattr(ctx.history, "history", ctx.history)
        steps = len(history) if history is not None else None
        for name in sorted(ctx.unused):
            m = named[name]
            parent, _, attr = name.rpartition(".")
            owner = type(named[parent]).__name__
            params = sum(p.numel() for p in m.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))
            where = "in the forward pass" + (f" or in any of {steps} recorded steps" if steps else "")
            yield self.finding(
                name,
                f"{type(m).__name__} {name} (created as {owner}.{attr}) is registered but never called {where}: "
                f"its {params} parameters get no gradient and its buffers keep their initial values",
                {"type": type(m).__name__, "owner": owner, "attribute": attr, "parameters": params,
                 "graph_method": ctx.graph.method, "recorded_steps": steps},
                fix=f"call {name} in {owner}.forward() where it was meant to normalize, or delete it",
            )
