"""Edits to the user's model source, made with LibCST so that comments and formatting survive.

A ``SourceEdit`` names a constructor call by the line it starts on and the class it constructs (what
``bnaudit.report.locations.layer_lines`` maps a layer to). ``apply_edits`` finds exactly that call, checks
that it is a literal call written once (not in a loop, a comprehension or a lambda; no ``*args``/``**kwargs``;
the argument to change is a literal, or absent), and changes only that call: one argument set, the call
replaced by ``nn.Identity()``, or an element of an ``nn.Sequential(...)`` literal moved. Anything it cannot
do exactly is returned as a refusal with the line to edit by hand; nothing is guessed. ``render_checked``
refuses any result that no longer compiles, so such text is never written."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import libcst as cst
from libcst.metadata import MetadataWrapper, ParentNodeProvider, PositionProvider

from bnaudit.errors import BnauditError

__all__ = [
    "FixSourceError",
    "SourceEdit",
    "Unfixable",
    "apply_edits",
    "positional_index",
    "render_checked",
    "reorder",
]


class FixSourceError(BnauditError):
    """Raised when an edited source would not compile (it is never written)."""


class Unfixable(Exception):
    """One edit that cannot be made exactly; the message says why."""


@dataclass(frozen=True)
class SourceEdit:
    """One change to one constructor call.

    Attributes:
        code: the rule whose finding it fixes.
        layer: the layer the finding names.
        line: the line the constructor call starts on.
        callee: the class the call constructs (``Linear``, ``BatchNorm1d``); the call's name must end in it.
        op: ``set`` (one argument), ``identity`` (the call becomes ``<prefix>.Identity()``), ``move`` (the
            call, an element of an ``nn.Sequential`` literal, moves to just after another element) or
            ``per-call`` (``self.<arg> = call`` becomes an ``nn.ModuleList`` of ``expect`` copies, and its one
            use, in a ``for t in range(expect)`` loop, ``self.<arg>[t]``).
        arg: for ``set``: the keyword.
        value: for ``set``: the new value's source text.
        expect: for ``set``: the value the argument must have now (its literal, or None when absent means
            the same); a different literal or an expression is refused.
        after_line, after_callee, after_layer: for ``move``: the element to move after (its line, class and
            layer name).
        description: what the edit does, for the user.
    """

    code: str
    layer: str
    line: int
    callee: str
    op: str
    arg: str = ""
    value: str = ""
    expect: object = None
    after_line: int | None = None
    after_callee: str = ""
    after_layer: str = ""
    description: str = ""


# Where each argument sits positionally in the constructors bnaudit edits.
_BN = {"eps": 1, "momentum": 2, "affine": 3, "track_running_stats": 4}
_LAZY_BN = {k: v - 1 for k, v in _BN.items()}
_POSITIONS: dict[str, dict[str, int]] = {
    "Linear": {"bias": 2},
    "LazyLinear": {"bias": 1},
    **{f"Conv{d}d": {"bias": 7} for d in (1, 2, 3)},
    **{f"ConvTranspose{d}d": {"bias": 7} for d in (1, 2, 3)},
    **{f"LazyConv{d}d": {"bias": 6} for d in (1, 2, 3)},
    **{f"BatchNorm{d}d": _BN for d in (1, 2, 3)},
    **{f"LazyBatchNorm{d}d": _LAZY_BN for d in (1, 2, 3)},
    "SyncBatchNorm": _BN,
}


def positional_index(callee: str, arg: str) -> int | None:
    """Where ``arg`` sits positionally in ``callee``'s constructor, or None when bnaudit does not know it."""
    return _POSITIONS.get(callee, {}).get(arg)


def reorder(count: int, moves: Iterable[tuple[int, int]]) -> list[int]:
    """The order of ``count`` elements after each ``(index, after)`` move, as a list of old indices.

    Each element ``index`` is taken out and put back just after element ``after`` (indices of the original
    order); moves apply in the order given.
    """
    order = list(range(count))
    for index, after in moves:
        order.remove(index)
        order.insert(order.index(after) + 1, index)
    return order


def _callee_name(call: cst.Call) -> str:
    fn = call.func
    if isinstance(fn, cst.Attribute):
        return fn.attr.value
    if isinstance(fn, cst.Name):
        return fn.value
    return ""


_NOT_LITERAL = (
    cst.For, cst.While, cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp, cst.Lambda,
)


def _literal_value(node: cst.BaseExpression) -> object:
    """The Python value of a number/True/False/None literal (``-1e-5`` included); raises ValueError otherwise."""
    if isinstance(node, cst.Name) and node.value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[node.value]
    if isinstance(node, (cst.Integer, cst.Float)):
        return node.evaluated_value
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
        inner = _literal_value(node.expression)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner
    raise ValueError("not a literal")


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))  # type: ignore[arg-type]


class _Locator(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider, ParentNodeProvider)

    def __init__(self) -> None:
        self.calls: dict[int, list[cst.Call]] = {}

    def visit_Call(self, node: cst.Call) -> None:
        line = self.get_metadata(PositionProvider, node).start.line
        self.calls.setdefault(line, []).append(node)


class _Editor(cst.CSTTransformer):
    def __init__(self, calls: dict[cst.Call, list[SourceEdit]], moves: dict[cst.Call, list[tuple[int, int]]],
                 uses: dict[cst.Call, str] | None = None):
        self.calls = calls
        self.moves = moves
        self.uses = uses or {}

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if original in self.uses:  # self.bn(x) in the loop -> self.bn[t](x)
            index = cst.SubscriptElement(cst.Index(cst.Name(self.uses[original])))
            updated = updated.with_changes(func=cst.Subscript(value=updated.func, slice=[index]))
        for edit in self.calls.get(original, []):
            if edit.op == "per-call":
                return _module_list(updated, int(edit.expect))  # type: ignore[call-overload]
            if edit.op == "set":
                updated = _set_arg(updated, edit)
            elif edit.op == "identity":
                updated = updated.with_changes(
                    func=updated.func.with_changes(attr=cst.Name("Identity")), args=()  # type: ignore[union-attr]
                )
        if original in self.moves:
            updated = updated.with_changes(args=_reordered(updated.args, self.moves[original]))
        return updated


def _module_list(call: cst.Call, count: int) -> cst.Call:
    """``nn.BatchNorm1d(8)`` -> ``nn.ModuleList([nn.BatchNorm1d(8) for _ in range(count)])``."""
    func = call.func.with_changes(attr=cst.Name("ModuleList"))  # type: ignore[union-attr]
    comp = cst.ListComp(elt=call, for_in=cst.CompFor(target=cst.Name("_"), iter=cst.parse_expression(f"range({count})")))
    return cst.Call(func=func, args=[cst.Arg(comp)])


def _keyword_arg(name: str, value: cst.BaseExpression, comma: cst.Comma | cst.MaybeSentinel) -> cst.Arg:
    none = cst.SimpleWhitespace("")
    return cst.Arg(value=value, keyword=cst.Name(name), equal=cst.AssignEqual(none, none), comma=comma)


def _set_arg(call: cst.Call, edit: SourceEdit) -> cst.Call:
    value = cst.parse_expression(edit.value)
    args = list(call.args)
    pos = positional_index(edit.callee, edit.arg)
    positional = [i for i, a in enumerate(args) if a.keyword is None]
    for i, a in enumerate(args):
        if (a.keyword is not None and a.keyword.value == edit.arg) or (
            a.keyword is None and pos is not None and pos < len(positional) and i == positional[pos]
        ):
            args[i] = a.with_changes(value=value)
            return call.with_changes(args=args)
    if not args:
        return call.with_changes(args=[_keyword_arg(edit.arg, value, cst.MaybeSentinel.DEFAULT)])
    last = args[-1]
    if isinstance(last.comma, cst.Comma):  # a trailing comma: the new argument follows the same layout
        between = args[-2].comma if len(args) > 1 and isinstance(args[-2].comma, cst.Comma) else last.comma
        args[-1] = last.with_changes(comma=between)
        args.append(_keyword_arg(edit.arg, value, last.comma))
    else:
        args[-1] = last.with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        args.append(_keyword_arg(edit.arg, value, cst.MaybeSentinel.DEFAULT))
    return call.with_changes(args=args)


def _reordered(args: Sequence[cst.Arg], moves: list[tuple[int, int]]) -> list[cst.Arg]:
    """``args`` in the new order; each keeps its own comma (and the comment on it), except that the last
    position keeps the original last comma and the space before ``)``, so a trailing comma (or its absence)
    stays where it was."""
    order = reorder(len(args), moves)
    out = [args[i] for i in order]
    if order[-1] != len(args) - 1:
        was_last = order.index(len(args) - 1)
        tail = out[-1]
        out[-1] = tail.with_changes(comma=out[was_last].comma, whitespace_after_arg=out[was_last].whitespace_after_arg)
        out[was_last] = out[was_last].with_changes(comma=tail.comma, whitespace_after_arg=tail.whitespace_after_arg)
    return out


def _check_literal_call(wrapper_parent: Callable[[cst.CSTNode], cst.CSTNode | None], call: cst.Call) -> None:
    if any(a.star for a in call.args):
        raise Unfixable("the call passes *args or **kwargs")
    node: cst.CSTNode | None = call
    while node is not None:
        node = wrapper_parent(node)
        if isinstance(node, _NOT_LITERAL):
            kind = "a loop" if isinstance(node, (cst.For, cst.While)) else (
                "a lambda" if isinstance(node, cst.Lambda) else "a comprehension")
            raise Unfixable(f"the call is inside {kind}, so it builds more than one layer")
        if isinstance(node, (cst.FunctionDef, cst.ClassDef, cst.Module)):
            return


def _find(calls: dict[int, list[cst.Call]], line: int, callee: str) -> cst.Call:
    found = [c for c in calls.get(line, []) if _callee_name(c) == callee]
    if not found:
        names = sorted({_callee_name(c) for c in calls.get(line, [])} - {""})
        seen = f" (the calls there: {', '.join(names)})" if names else ""
        raise Unfixable(f"no literal {callee}(...) call starts on this line{seen}")
    if len(found) > 1:
        raise Unfixable(f"{len(found)} {callee}(...) calls start on this line; cannot tell which one")
    return found[0]


def _check_set(call: cst.Call, edit: SourceEdit) -> None:
    pos = positional_index(edit.callee, edit.arg)
    if pos is None:
        raise Unfixable(f"bnaudit does not know where {edit.callee} takes {edit.arg}")
    positional = [a for a in call.args if a.keyword is None]
    current = next((a for a in call.args if a.keyword is not None and a.keyword.value == edit.arg), None)
    if current is None and pos < len(positional):
        current = positional[pos]
    if current is None:
        return  # absent: the default, which the finding was about
    try:
        value = _literal_value(current.value)
    except ValueError:
        text = cst.Module(body=[]).code_for_node(current.value)
        raise Unfixable(f"{edit.arg} is the expression `{text}`, not a literal") from None
    if edit.expect is not None and not _same_value(value, edit.expect):
        raise Unfixable(f"{edit.arg}={value!r} is written here, but the layer has {edit.arg}={edit.expect!r}")


def _plan_move(
    calls: dict[int, list[cst.Call]], parent: Callable[[cst.CSTNode], cst.CSTNode | None], call: cst.Call,
    edit: SourceEdit, layer_index: int | None,
) -> tuple[cst.Call, tuple[int, int]]:
    arg = parent(call)
    seq = parent(arg) if isinstance(arg, cst.Arg) else None
    if not isinstance(seq, cst.Call) or _callee_name(seq) != "Sequential":
        raise Unfixable("the layer is not an element of an nn.Sequential(...) literal")
    assert edit.after_line is not None
    target = _find(calls, edit.after_line, edit.after_callee)
    target_arg = parent(target)
    if not isinstance(target_arg, cst.Arg) or parent(target_arg) is not seq:
        raise Unfixable(f"the {edit.after_callee} at line {edit.after_line} is not in the same nn.Sequential")
    index = list(seq.args).index(arg)
    if layer_index is not None and index != layer_index:
        raise Unfixable("the nn.Sequential's elements do not match the model's layers")
    return seq, (index, list(seq.args).index(target_arg))


def _is_self_attr(node: cst.CSTNode, attr: str) -> bool:
    return (isinstance(node, cst.Attribute) and isinstance(node.value, cst.Name) and node.value.value == "self"
            and node.attr.value == attr)


class _SelfAttrs(cst.CSTVisitor):
    def __init__(self, attr: str) -> None:
        self.attr, self.found = attr, 0

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self.found += _is_self_attr(node, self.attr)


def _ancestor(parent: Callable[[cst.CSTNode], cst.CSTNode | None], node: cst.CSTNode, kind: type) -> cst.CSTNode | None:
    current = parent(node)
    while current is not None and not isinstance(current, kind):
        current = parent(current)
    return current


def _plan_per_call(
    calls: dict[int, list[cst.Call]], parent: Callable[[cst.CSTNode], cst.CSTNode | None], call: cst.Call,
    edit: SourceEdit,
) -> tuple[cst.Call, str]:
    """For BN105: the one ``self.<attr>(...)`` call in a ``for VAR in range(N)`` loop of the class that
    assigns ``self.<attr> = <call>`` (N the number of calls the audit counted), and VAR."""
    assign = parent(call)
    if not (isinstance(assign, cst.Assign) and len(assign.targets) == 1
            and _is_self_attr(assign.targets[0].target, edit.arg)) or not isinstance(call.func, cst.Attribute):
        raise Unfixable(f"the BatchNorm is not created as self.{edit.arg} = nn.<BatchNorm>(...)")
    cls = _ancestor(parent, call, cst.ClassDef)
    uses = [c for cs in calls.values() for c in cs
            if _is_self_attr(c.func, edit.arg) and _ancestor(parent, c, cst.ClassDef) is cls]
    counter = _SelfAttrs(edit.arg)
    if cls is not None:
        cls.visit(counter)
    if cls is None or len(uses) != 1 or counter.found != 2:
        raise Unfixable(f"self.{edit.arg} must be called at exactly one place in its class, and used nowhere else")
    loop = _ancestor(parent, uses[0], (cst.For, cst.FunctionDef))  # type: ignore[arg-type]
    it = loop.iter if isinstance(loop, cst.For) else None
    if not (isinstance(loop, cst.For) and isinstance(loop.target, cst.Name) and isinstance(it, cst.Call)
            and _callee_name(it) == "range" and len(it.args) == 1 and isinstance(it.args[0].value, cst.Integer)
            and it.args[0].value.evaluated_value == edit.expect):
        raise Unfixable(f"the call is not in a `for t in range({edit.expect})` loop")
    return uses[0], loop.target.value


def apply_edits(
    text: str, edits: Sequence[SourceEdit], *, indices: dict[str, int] | None = None, path: str = "<source>",
) -> tuple[str, list[SourceEdit], list[tuple[SourceEdit, str]]]:
    """Apply ``edits`` to the source ``text``.

    Args:
        text: the module's source.
        edits: the edits; each that cannot be made exactly is refused, the others are made.
        indices: for ``move`` edits, the layer's index in its nn.Sequential (a check that source and model
            agree).
        path: the file's name, for messages.

    Returns:
        (new text, edits made, [(edit refused, why)]).

    Raises:
        FixSourceError: the text does not parse, or the edited text would not compile.
    """
    try:
        wrapper = MetadataWrapper(cst.parse_module(text))
    except cst.ParserSyntaxError as exc:
        raise FixSourceError(f"{path}: cannot parse it ({exc.message}); fix the syntax first") from None
    locator = _Locator()
    wrapper.visit(locator)
    parents = wrapper.resolve(ParentNodeProvider)

    def parent(node: cst.CSTNode) -> cst.CSTNode | None:
        return parents.get(node)

    by_call: dict[cst.Call, list[SourceEdit]] = {}
    moves: dict[cst.Call, list[tuple[int, int]]] = {}
    uses: dict[cst.Call, str] = {}
    made: list[SourceEdit] = []
    refused: list[tuple[SourceEdit, str]] = []
    for edit in edits:
        try:
            call = _find(locator.calls, edit.line, edit.callee)
            _check_literal_call(parent, call)
            if edit.op == "set":
                _check_set(call, edit)
                by_call.setdefault(call, []).append(edit)
            elif any(e.op != "set" for e in by_call.get(call, [])) and edit.op != "set":
                raise Unfixable("another fix already replaces this call")
            elif edit.op == "per-call":
                use, var = _plan_per_call(locator.calls, parent, call, edit)
                uses[use] = var
                by_call.setdefault(call, []).append(edit)
            elif edit.op == "identity":
                if not isinstance(call.func, cst.Attribute):
                    raise Unfixable(f"{edit.callee} is imported by name; nn.Identity() would need an import")
                by_call.setdefault(call, []).append(edit)
            else:
                seq, move = _plan_move(locator.calls, parent, call, edit, (indices or {}).get(edit.layer))
                moves.setdefault(seq, []).append(move)
        except Unfixable as exc:
            refused.append((edit, str(exc)))
            continue
        made.append(edit)
    if not made:
        return text, made, refused
    return render_checked(wrapper, _Editor(by_call, moves, uses), path=path), made, refused


def render_checked(wrapper: MetadataWrapper | cst.Module, transformer: cst.CSTTransformer, *, path: str) -> str:
    """The code ``transformer`` makes of the module, checked to compile.

    Raises:
        FixSourceError: the result does not compile (it must never be written).
    """
    module = wrapper.visit(transformer)
    code = module.code
    try:
        compile(code, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise FixSourceError(
            f"{path}: the edited source would not compile ({exc}); nothing was written (a bug in bnaudit fix)"
        ) from None
    return code
