"""BN1xx, wiring: where normalization sits in the layer graph (biases it cancels, activations and dropout
before it, a layer reused or never run, a network with none), read without training anything; how each
normalization layer is configured (momentum, eps, axis) is in ``layer_settings``.

Each rule's docstring is its documentation (``bnaudit rules BN101``): what it checks, why, its options as
YAML, and a bad/good example. Each carries ``invalid`` cases that must fire and ``valid`` cases that must not
(``examples_architecture``)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from bnaudit.context import RuleContext
from bnaudit.findings import Finding
from bnaudit.graph import OUTPUT, Node
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
from bnaudit.rules import examples_architecture as ex
from bnaudit.rules.base import Example, Rule, register
from bnaudit.rules.common import graph_batchnorms, name_list

# What a dropout's variance shift does not survive on its way to a BatchNorm (BN104).
_RESCALING = NORM_FUNCTIONS | SOFTMAX_FUNCTIONS


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
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), ex.x, layer="0"),
        Example(lambda: ex.mlp(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), ex.img, layer="0"),
        Example(lambda: ex.BiasTo(flatten=True), ex.x, layer="fc", note="a flatten between them is a pure reshape"),
    )
    valid = (
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), ex.x),
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), ex.x,
                note="an activation between them: the bias matters"),
        Example(lambda: ex.BiasTo(activation=True), ex.x,
                note="F.relu in forward between them: an edge straight to the BatchNorm, but not a pure reshape"),
        Example(lambda: ex.BiasTo(residual=True), ex.x,
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
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), ex.x, layer="2"),
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), ex.x,
                options={"placement": "after-activation"}, layer="1"),
    )
    valid = (
        Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), ex.x),
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), ex.x,
                options={"placement": "any"}),
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), ex.x,
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
        for node in graph_batchnorms(ctx):
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
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2)), ex.x, layer="3"),
        Example(lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2), nn.Softmax(dim=1)), ex.x,
                layer="3", note="a softmax after it does not help"),
    )
    valid = (Example(lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), ex.x),)

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
            lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
            ex.x, layer="3",
        ),
        Example(ex.TwoBranches, ex.x, layer="drop", note="one Dropout feeding two BatchNorms: one finding"),
    )
    valid = (
        Example(
            lambda: ex.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)),
            ex.x,
        ),
        Example(lambda: ex.mlp(nn.Dropout(0.0), nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2)), ex.x,
                note="p=0 changes nothing"),
        Example(
            lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.3), ex.NormedBlock(8), nn.Linear(8, 8, bias=False),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
            ex.x, note="F.layer_norm inside a block's forward between them",
        ),
        Example(
            lambda: ex.mlp(nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 8), ex.RmsNorm(8),
                         nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
            ex.x, note="a third-party RmsNorm between them",
        ),
        Example(ex.BiasedAttention, ex.tokens, note="a dropout in an attention bias MLP reaches the BatchNorm as weights"),
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
                else f"feeds {len(bns)} BatchNorm layers with no normalization between ({name_list(bns)}; the nearest, "
                f"{nearest}{through})"
            )
            yield self.finding(
                name,
                f"{name} (p={p:g}) {feeds}: its train-time variance differs from eval, so the running statistics "
                "will not match inference",
                {"dropout": name, "p": p, "batchnorms": bns, "path": list(path)},
                fix=f"move {name} after the last BatchNorm it feeds (just before the output layer), or remove it",
            )
        for node in graph_batchnorms(ctx):
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
    invalid = (Example(lambda: ex.SharedBN(shared=True), ex.x, layer="bns.0"),)
    valid = (Example(lambda: ex.SharedBN(shared=False), ex.x),)

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        for node in graph_batchnorms(ctx):
            if node.calls > 1:
                yield self.finding(
                    node.name,
                    f"{node.name} is called {node.calls} times per forward; its running statistics mix all calls",
                    {"calls": node.calls},
                )


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
    invalid = (Example(lambda: ex.deep(None), ex.x),)
    valid = (
        Example(lambda: ex.mlp(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)), ex.x, note="shallow"),
        Example(lambda: ex.deep(nn.BatchNorm1d), ex.x),
        Example(lambda: ex.deep(ex.RmsNorm), ex.x, note="a third-party RmsNorm, known by its class name"),
        Example(lambda: ex.deep(ex.BatchVarianceScale), ex.x, note="a normalization layer known by its running_var"),
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
    invalid = (Example(ex.MorvanNet, ex.scalar_x, layer="bn_input", note='the tutorial\'s "without BN" net'),)
    valid = (
        Example(lambda: ex.MorvanNet(do_bn=True), ex.scalar_x, note='the "with BN" net: only the call differs'),
        Example(ex.BranchBN, ex.x, note="called in a branch the example input takes"),
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
