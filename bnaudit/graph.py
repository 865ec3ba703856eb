"""Who feeds whom: the layer graph of a model.

Dataflow comes from torch.fx where the model traces symbolically, and otherwise from running one forward
pass with module hooks plus a ``TorchFunctionMode`` that follows every tensor from the module that produced
it, through functional ops, to the module that consumes it. Either way each leaf module gets its call count
and input/output shapes when an example input is available. ``LayerGraph.method`` says which was used.

Nodes are leaf modules (no children) and normalization layers, named by their qualified names. Edges run
from producer to consumer and carry ``via``: the functional ops between them (``flatten``, ``relu``,
``add``...). Pseudo-nodes ``<input>`` and ``<output>`` stand for the model's inputs and outputs."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bnaudit.findings import LayerInfo
from bnaudit.layers import RESHAPE_FUNCTIONS, eval_mode, is_norm, norm_kind, param_count

INPUT = "<input>"
OUTPUT = "<output>"
# One-input operations after which a layer's output is still the model's output: reshapes and the squashing a
# classifier or regressor applies last (log_softmax(fc(x)), fc(x).squeeze(1), torch.sigmoid(head(x))).
_OUTPUT_OPS = RESHAPE_FUNCTIONS | {"softmax", "log_softmax", "softmin", "sigmoid", "tanh"}
_MAX_VIA = 12  # longest chain of functional ops kept on an edge; long enough for any rule's question


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    via: tuple[str, ...] = ()


@dataclass
class Node:
    name: str
    module: nn.Module
    calls: int = 0
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def type(self) -> str:
        return type(self.module).__name__


@dataclass
class LayerGraph:
    """Leaf modules in execution order, with dataflow edges between them.

    Attributes:
        method: ``fx`` or ``hooks``.
        note: why that method was used (e.g. the fx error), shown in reports.
        nodes: name -> Node, in execution order when a forward pass ran, else in fx order.
        edges: producer -> consumer edges (including ``<input>`` and ``<output>``).
        shapes_known: whether a forward pass filled the shapes and call counts.
    """

    method: str
    note: str
    nodes: dict[str, Node]
    edges: list[Edge]
    shapes_known: bool = False
    _in: dict[str, list[Edge]] = field(default_factory=dict, repr=False)
    _out: dict[str, list[Edge]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.edges = sorted(set(self.edges), key=lambda e: (e.src, e.dst, e.via))
        inc: dict[str, list[Edge]] = defaultdict(list)
        out: dict[str, list[Edge]] = defaultdict(list)
        for e in self.edges:
            inc[e.dst].append(e)
            out[e.src].append(e)
        self._in, self._out = dict(inc), dict(out)

    def parents(self, name: str) -> list[Edge]:
        """Edges into ``name`` (its direct producers)."""
        return self._in.get(name, [])

    def children(self, name: str) -> list[Edge]:
        """Edges out of ``name`` (its direct consumers)."""
        return self._out.get(name, [])

    def module(self, name: str) -> nn.Module | None:
        node = self.nodes.get(name)
        return node.module if node else None

    def upstream(self, name: str, through: Callable[[Node], bool]) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Walk producers backwards from ``name``, yielding ``(node, path)`` for every node reached, and
        continuing past a node only while ``through(node)`` is true. ``path`` lists the nodes between."""
        seen = {name}
        stack: list[tuple[str, tuple[str, ...]]] = [(e.src, ()) for e in self.parents(name)]
        while stack:
            src, path = stack.pop()
            if src in seen or src not in self.nodes:
                continue
            seen.add(src)
            yield src, path
            if through(self.nodes[src]):
                stack.extend((e.src, (*path, src)) for e in self.parents(src))

    def downstream(
        self,
        name: str,
        through: Callable[[Node], bool],
        follow: Callable[[Edge], bool] | None = None,
    ) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Walk consumers forwards from ``name``, nearest first, yielding ``(node, path)`` for every node
        reached (``path``: the nodes between, on a shortest way there), continuing past a node only while
        ``through(node)`` is true and along an edge only while ``follow(edge)`` is (default: every edge)."""
        seen = {name}
        queue = deque((e, ()) for e in self.children(name))
        while queue:
            edge, path = queue.popleft()
            dst = edge.dst
            if dst in seen or dst not in self.nodes or (follow is not None and not follow(edge)):
                continue
            seen.add(dst)
            yield dst, path
            if through(self.nodes[dst]):
                queue.extend((e, (*path, dst)) for e in self.children(dst))

    def output_layers(self) -> frozenset[str]:
        """The layers whose output the model returns: directly, through one-input operations (reshapes, a
        final softmax, sigmoid or tanh), or through parameter-free modules (``nn.LogSoftmax``, ``nn.Flatten``)
        back to and including the first layer with parameters. A layer whose output is combined with another
        on the way (``fc(x) + skip``, ``torch.cat``) is not one: neither side is the output alone."""
        found: set[str] = set()
        todo = list(self.parents(OUTPUT))
        while todo:
            e = todo.pop()
            if e.src not in self.nodes or e.src in found or not set(e.via) <= _OUTPUT_OPS:
                continue
            found.add(e.src)
            module, parents = self.nodes[e.src].module, self.parents(e.src)
            if next(module.parameters(), None) is None and len(parents) == 1:
                todo.append(parents[0])
        return frozenset(found)

    def layer_infos(self) -> tuple[LayerInfo, ...]:
        return tuple(
            LayerInfo(
                name=n.name,
                type=n.type,
                input_shapes=tuple(n.input_shapes[:1]),
                output_shapes=tuple(n.output_shapes[:1]),
                calls=n.calls,
                normalization=norm_kind(n.module),
                params=param_count(n.module),
            )
            for n in self.nodes.values()
        )


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_torch_composite(m: nn.Module) -> bool:
    # torch.nn's own composite layers (MultiheadAttention, TransformerEncoderLayer, ...) are opaque units:
    # their internals hold no BatchNorm, and their forwards branch on tensor properties fx cannot trace.
    return type(m).__module__.startswith("torch.nn.") and not isinstance(m, _CONTAINERS)


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules the graph treats as nodes: those without children, every normalization layer (whose
    subclasses may wrap children of their own), and torch.nn's composite layers."""
    out: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if is_norm(m) or _is_torch_composite(m) or next(m.children(), None) is None:
            out[name] = m
            skip_prefixes.append(name + ".")
    return out


def uncalled_norms(model: nn.Module, graph: LayerGraph) -> list[str]:
    """Normalization layers the graph would hold as nodes but that never ran: registered on ``model`` and
    absent from ``graph`` (not in the fx trace, and not called in its forward pass). Norms inside an opaque
    torch composite (a TransformerEncoderLayer's LayerNorms) are not graph nodes and are never listed."""
    return [name for name, m in leaf_modules(model).items() if is_norm(m) and name not in graph.nodes]


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1]


def _fx_edges(model: nn.Module, leaves: dict[str, nn.Module]) -> tuple[list[Edge], dict[str, int], list[str]]:
    import torch.fx

    leaf_ids = {id(m) for m in leaves.values()}

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in leaf_ids

    graph = _Tracer().trace(model)
    memo: dict[Any, frozenset[tuple[str, tuple[str, ...]]]] = {}

    def producers(node: Any) -> frozenset[tuple[str, tuple[str, ...]]]:
        if node in memo:
            return memo[node]
        if node.op == "placeholder":
            result = frozenset({(INPUT, ())})
        elif node.op == "call_module":
            result = frozenset({(str(node.target), ())})
        elif node.op == "get_attr":
            result = frozenset()
        else:
            op = _op_name(node.target)
            acc = set()
            for arg in node.all_input_nodes:
                for src, via in producers(arg):
                    acc.add((src, (*via, op)[-_MAX_VIA:]))
            result = frozenset(acc)
        memo[node] = result
        return result

    edges: list[Edge] = []
    calls: dict[str, int] = defaultdict(int)
    order: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            dst = str(node.target)
            calls[dst] += 1
            if dst not in order:
                order.append(dst)
            for arg in node.all_input_nodes:
                edges.extend(Edge(src, dst, via) for src, via in producers(arg))
        elif node.op == "output":
            for arg in node.all_input_nodes:
                edges.extend(Edge(src, OUTPUT, via) for src, via in producers(arg))
    return edges, dict(calls), order


def _shape_list(values: Any) -> list[tuple[int, ...]]:
    flat, _ = tree_flatten(values)
    return [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]


class _Provenance(TorchFunctionMode):
    """Tags every tensor produced by a torch op with the modules it came from and the ops since."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[torch.Tensor, frozenset[tuple[str, tuple[str, ...]]]]] = {}

    def tag(self, value: Any, sources: frozenset[tuple[str, tuple[str, ...]]]) -> None:
        flat, _ = tree_flatten(value)
        for t in flat:
            if isinstance(t, torch.Tensor):
                # Holding the tensor keeps its id unique for the duration of the pass.
                self.tags[id(t)] = (t, sources)

    def sources(self, value: Any) -> frozenset[tuple[str, tuple[str, ...]]]:
        flat, _ = tree_flatten(value)
        acc: set[tuple[str, tuple[str, ...]]] = set()
        for t in flat:
            if isinstance(t, torch.Tensor) and id(t) in self.tags:
                acc |= self.tags[id(t)][1]
        return frozenset(acc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        srcs = self.sources((args, kwargs))
        if srcs:
            op = _op_name(func)
            self.tag(out, frozenset((s, (*via, op)[-_MAX_VIA:]) for s, via in srcs))
        return out


def _hook_pass(
    model: nn.Module, leaves: dict[str, nn.Module], example: Any, run: Callable[[nn.Module, Any], Any], track: bool
) -> tuple[dict[str, Node], list[Edge]]:
    nodes: dict[str, Node] = {}
    edges: list[Edge] = []
    prov = _Provenance() if track else None
    handles = []

    def pre_hook(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            node = nodes.setdefault(name, Node(name, module))
            node.calls += 1
            if len(node.input_shapes) < 4:
                shapes = _shape_list(args)
                node.input_shapes.append(tuple(shapes[0]) if shapes else ())
            if prov is not None:
                edges.extend(Edge(src, name, via) for src, via in prov.sources(args))

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            node = nodes[name]
            if len(node.output_shapes) < 4:
                shapes = _shape_list(output)
                node.output_shapes.append(shapes[0] if shapes else ())
            if prov is not None:
                prov.tag(output, frozenset({(name, ())}))

        return hook

    try:
        for name, m in leaves.items():
            handles.append(m.register_forward_pre_hook(pre_hook(name)))
            handles.append(m.register_forward_hook(post_hook(name)))
        with torch.no_grad():
            if prov is not None:
                prov.tag(example, frozenset({(INPUT, ())}))
                with prov:
                    output = run(model, example)
                edges.extend(Edge(src, OUTPUT, via) for src, via in prov.sources(output))
            else:
                run(model, example)
    finally:
        for h in handles:
            h.remove()
    return nodes, edges


def default_run(model: nn.Module, example: Any) -> Any:
    return model(example)


def build_graph(
    model: nn.Module,
    example: Any | None = None,
    *,
    run: Callable[[nn.Module, Any], Any] = default_run,
    prefer: str = "fx",
) -> LayerGraph:
    """Build the layer graph of ``model``.

    Runs at most one forward pass, under no_grad and in eval mode, restoring every module's training flag
    afterwards; the caller passes a copy when buffers must not move (eval mode leaves them alone anyway).

    Args:
        model: the module to analyse.
        example: an input for one forward pass (fills shapes and call counts). Without it only fx can
            find the dataflow, and shapes stay unknown.
        run: how to call the model on ``example`` (default ``model(example)``).
        prefer: ``fx`` (use torch.fx when it traces) or ``hooks`` (always follow tensors at run time).

    Returns:
        The LayerGraph; ``method`` says how dataflow was found and ``note`` why.

    Raises:
        Exception: whatever the model's forward raises on ``example``; callers turn it into DataError.
    """
    leaves = leaf_modules(model)
    fx_edges: list[Edge] | None = None
    fx_calls: dict[str, int] = {}
    fx_order: list[str] = []
    note = ""
    if prefer == "fx":
        try:
            fx_edges, fx_calls, fx_order = _fx_edges(model, leaves)
            note = "torch.fx symbolic trace"
        except Exception as exc:  # noqa: BLE001 - any trace failure means: fall back to hooks
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            note = f"torch.fx could not trace ({type(exc).__name__}: {first[:160]}); dataflow followed at run time"
    else:
        note = "dataflow followed at run time"

    if example is None:
        if fx_edges is None:
            raise ValueError(f"the model needs an example input to build its graph: {note}")
        nodes = {name: Node(name, leaves[name], calls=fx_calls.get(name, 0)) for name in fx_order}
        return LayerGraph("fx", note + "; no input given, shapes unknown", nodes, fx_edges, shapes_known=False)

    with eval_mode(model):
        nodes, hook_edges = _hook_pass(model, leaves, example, run, track=fx_edges is None)
    if fx_edges is not None:
        # fx order is static; keep run-time order but add layers fx saw that did not run this time.
        for name in fx_order:
            if name not in nodes:
                nodes[name] = Node(name, leaves[name])
        return LayerGraph("fx", note, nodes, fx_edges, shapes_known=True)
    return LayerGraph("hooks", note, nodes, hook_edges, shapes_known=True)
