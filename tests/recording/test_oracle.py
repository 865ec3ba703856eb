"""bnaudit.record against the naive reference in ``oracle.py``: every recorded step, layer and statistic of the
recorder must equal the oracle's float64 computation on the very tensors it saw, on the fixture architectures,
on Hypothesis-generated networks (chains, DAGs, in-place ops, shared modules, three dtypes, every/per_channel/
layers/units), on NaN/Inf activations and on the four-conv chain that a data_ptr-keyed cache gets wrong; and
recording must leave the model bit-identical to a twin trained without it."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from bnaudit.recording import default_layers, record
from tests.fixtures.architectures import ARCHITECTURES
from tests.recording.oracle import AMBIGUOUS, Oracle, expected_channel_dim, resolve_layers

KINDS = ("structure", "stats", "quantiles", "bn", "updated")  # what compare() sorts differences into
SCALARS = ("mean", "var", "std", "min", "max", "zero_frac", "nonfinite_frac")


# --- running a model with and without the recorder ----------------------------------------------------------------
def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, mode: str) -> None:
    """One step: "train" (train mode, backward, SGD), "nograd" (train mode under no_grad: BatchNorm still
    updates its buffers) or "eval" (eval mode under no_grad)."""
    if mode == "train":
        model.train()
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        return
    model.train(mode == "nograd")
    with torch.no_grad():
        model(x)


def _set_odd(model: nn.Module, i: int) -> None:
    if hasattr(model, "odd"):
        model.odd = i % 2 == 1


def run_plain(model: nn.Module, steps: list[tuple[torch.Tensor, str]]) -> None:
    torch.manual_seed(1234)  # dropout draws the same masks in the recorded run and its twin
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i, (x, mode) in enumerate(steps):
        _set_odd(model, i)
        _step(model, opt, x, mode)


def run_recorded(model: nn.Module, steps: list[tuple[torch.Tensor, str]], *, layers=None, per_channel=True,
                 every=1, units=None, quantiles=(0.15, 0.5, 0.85)):
    """``run_plain`` inside ``record`` with the oracle hooked after it: (history, oracle)."""
    torch.manual_seed(1234)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with record(model, layers=layers, per_channel=per_channel, every=every, units=units, quantiles=quantiles) as rec:

        def declared(name: str) -> int | None:
            # The recorder's word for the layout. A layer it has not declared (it skipped the row) is reduced
            # as one channel: that row is compared as not called anyway, or the missing layer is reported.
            info = rec.history.info.get(name)
            if info is not None:
                return info["channel_dim"]
            return None

        with Oracle(model, channel_dim=declared, layers=layers, every=every, units=units,
                    quantiles=quantiles) as oracle:
            for i, (x, mode) in enumerate(steps):
                _set_odd(model, i)
                _step(model, opt, x, mode)
                rec.step()
                oracle.step()
    return rec.history, oracle


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(-1).view(torch.uint8),
                                                          sb[k].view(-1).view(torch.uint8)), k


# --- comparing ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    """Tolerances, relative to the oracle's own scale. The history stores float32, and the recorder reduces in
    float32 arithmetic at worst; a bfloat16 tensor is reduced upcast to float32, where its values are exact,
    so against the oracle's float64 of the same bf16 values the only error is float32 accumulation, as for a
    float32 model: one set fits all three dtypes, bfloat16 needs nothing looser. A mean is off by a few
    float32 ulps of the layer's scale (|mean| + std), a variance by a few ulps of itself plus float32's
    rounding of the mean, squared; an extreme by float32 storage alone."""

    mean: float = 1e-5  # x (|ref| + std)
    var: float = 1e-4  # relative
    var_floor: float = 1e-9  # x (mean^2 + var): cancellation when the spread is far below the mean
    ext: float = 1e-6  # relative, min/max/BatchNorm buffers (float32 storage of exact element values)
    frac: float = 1e-7


TOL = Tol()


def _mismatch(got, ref, atol) -> np.ndarray:
    """Positions where ``got`` differs from ``ref``: NaN where the other is not, a different infinity, or a
    finite difference above ``atol`` (scalar or same-shaped array)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    atol = np.broadcast_to(np.asarray(atol, np.float64), ref.shape)
    bad = np.isnan(got) != np.isnan(ref)
    bad |= np.isinf(ref) & (got != ref)
    fin = np.isfinite(ref)
    with np.errstate(invalid="ignore"):
        bad |= fin & ~(np.abs(got - ref) <= atol)
    return bad


def _scalar_atol(stat: str, ref: dict[str, Any]) -> float:
    if stat in ("zero_frac", "nonfinite_frac"):
        return TOL.frac
    if stat in ("min", "max"):
        return TOL.ext * abs(ref[stat]) + 1e-37
    m, v = abs(ref["mean"]), ref["var"]
    if not (np.isfinite(m) and np.isfinite(v)):
        return 0.0  # NaN or an infinity: _mismatch wants the same one
    scale2 = m * m + v
    if stat == "mean":
        return TOL.mean * (m + np.sqrt(v)) + 1e-12
    if stat == "var":
        return TOL.var * v + TOL.var_floor * scale2 + 1e-30
    return TOL.var * np.sqrt(v) + np.sqrt(TOL.var_floor * scale2) + 1e-15  # std


def _channel_atol(stat: str, ref: dict[str, Any]) -> np.ndarray:
    cm, cv = ref["channel_mean"].numpy(), ref["channel_var"].numpy()
    with np.errstate(invalid="ignore"):
        scale2 = cm * cm + cv
        if stat == "channel_mean":
            return TOL.mean * (np.abs(cm) + np.sqrt(cv)) + 1e-12
        if stat == "channel_var":
            return TOL.var * cv + TOL.var_floor * scale2 + 1e-30
        return TOL.var * np.sqrt(cv) + np.sqrt(TOL.var_floor * scale2) + 1e-15


def _fmt(a) -> str:
    return np.array2string(np.asarray(a, np.float64), precision=6, max_line_width=200)


def compare(h, oracle: Oracle, *, per_channel: bool = True) -> dict[str, list[str]]:
    """Every difference between the history and the oracle, one line each ("layer stat step: got ... expected
    ..."), by kind (``KINDS``). Nothing is excused: a layer whose output a functional in-place op overwrites
    must still be recorded every step (its hook runs before the op)."""
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    rows = oracle.rows
    steps = [r["step"] for r in rows]
    if list(h.steps) != steps:
        out["structure"].append(f"steps: got {list(h.steps)} expected {steps}")
        return out
    if list(h.updated) != [r["updated"] for r in rows]:
        out["updated"].append(f"updated: got {list(h.updated)} expected {[r['updated'] for r in rows]}")

    if set(h.layers) != set(oracle.order):
        out["structure"].append(f"layers: got {sorted(h.layers)} expected {sorted(oracle.order)}")

    for name in [n for n in oracle.order if n in h.layers]:
        info = h.info[name]
        if info["where"] != oracle.where[name]:
            out["structure"].append(f"{name} where: got {info['where']} expected {oracle.where[name]}")
        module, ndim = oracle.first_seen[name]
        declared, expected = info["channel_dim"], expected_channel_dim(module, ndim)
        if isinstance(expected, int) and len({s[expected] for s in oracle.shapes[name]}) > 1:
            expected = AMBIGUOUS  # called at several widths: the steps that mix them hold whole-tensor summaries
        if not per_channel:
            if declared is not None:
                out["structure"].append(f"{name} channel_dim: got {declared} expected None (per_channel=False)")
        elif expected is not AMBIGUOUS and not (
            declared is None if expected is None else declared is not None and declared % ndim == expected
        ):
            what = f"{name} ({type(module).__name__}, {ndim}-D)"
            out["structure"].append(f"{what} channel_dim: got {declared} expected {expected}")

        got = {s: h.series(name, s) for s in (*SCALARS, "count", "calls", "channel_mean", "channel_var", "channel_std")}
        units = oracle.units.get(name, [])
        if units:
            got["quantiles"] = h.series(name, "quantiles")
        for i, row in enumerate(rows):
            ref = row["layers"][name]
            step = row["step"]
            for stat in ("calls", "count"):
                if ref[stat] is not None and got[stat][i] != ref[stat]:
                    out["stats"].append(f"{name} {stat} step {step}: got {got[stat][i]} expected {ref[stat]}")
            for stat in SCALARS:
                if _mismatch(got[stat][i], ref[stat], _scalar_atol(stat, ref)).any():
                    out["stats"].append(f"{name} {stat} step {step}: got {got[stat][i]!r} expected {ref[stat]!r}")
            for stat in ("channel_mean", "channel_var", "channel_std"):
                g = got[stat][i]
                if ref["calls"] == 0:
                    if not np.isnan(g).all():
                        out["stats"].append(f"{name} {stat} step {step}: got {_fmt(g)} expected NaN (not called)")
                    continue
                if ref[stat] is None:  # calls of different widths: no per-channel reference
                    continue
                r = ref[stat].numpy()
                if g.shape != r.shape:
                    out["structure"].append(f"{name} {stat} step {step}: got width {g.shape} expected {r.shape}")
                elif _mismatch(g, r, _channel_atol(stat, ref)).any():
                    out["stats"].append(f"{name} {stat} step {step}: got {_fmt(g)} expected {_fmt(r)}")
            if units:
                g, r = got["quantiles"][i], ref["quantiles"].numpy()
                atol = TOL.mean * (np.abs(r) + np.sqrt(ref["var"])) + 1e-12 if ref["calls"] else 0.0
                if g.shape != r.shape or _mismatch(g, r, atol).any():
                    out["quantiles"].append(f"{name} quantiles step {step}: got {_fmt(g)} expected {_fmt(r)}")

    bns = list(rows[0]["bns"]) if rows else []
    if list(h.bn_layers) != bns:
        out["structure"].append(f"bn_layers: got {h.bn_layers} expected {bns}")
        return out
    for name in bns:
        modes = h.bn_modes(name)
        refs = [r["bns"][name] for r in rows]
        for stat, g in (("training", modes.training), ("requires_grad", modes.requires_grad),
                        ("num_batches_tracked", modes.num_batches_tracked), ("updated", modes.updated)):
            r = [r["updated"] for r in rows] if stat == "updated" else [x[stat] for x in refs]
            if list(g) != r:
                kind = "updated" if stat == "updated" else "bn"
                out[kind].append(f"{name} bn_modes.{stat}: got {list(g)} expected {r}")
        nbt, r = list(h.series(name, "num_batches_tracked")), [x["num_batches_tracked"] for x in refs]
        if nbt != r:
            out["bn"].append(f"{name} num_batches_tracked: got {nbt} expected {r}")
        if not per_channel:  # documented: per_channel=False keeps a BatchNorm's counter and flags, not its buffers
            continue
        for stat in ("running_mean", "running_var"):
            g = h.series(name, stat)
            for i, x in enumerate(refs):
                r = x[stat].numpy()
                if g[i].shape != r.shape or _mismatch(g[i], r, TOL.ext * np.abs(r) + 1e-30).any():
                    out["bn"].append(f"{name} {stat} step {rows[i]['step']}: got {_fmt(g[i])} expected {_fmt(r)}")
    return out


def assert_matches(h, oracle: Oracle, **kw) -> None:
    found = compare(h, oracle, **kw)
    report = "differences from the oracle:\n" + "\n".join(m for k in KINDS for m in found[k][:20])
    # One assert per kind: Hypothesis tells failures apart by the line that raised, so each kind of difference
    # gets a minimal example of its own instead of hiding behind another (`updated` last: the least telling).
    assert not found["structure"], report
    assert not found["stats"], report
    assert not found["quantiles"], report
    assert not found["bn"], report
    assert not found["updated"], report


# --- 1. the fixture architectures -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_architectures_match_oracle(arch):
    model = arch.build().requires_grad_(True)  # a model frozen at load (served_cnn) is trained here all the same
    x = arch.example()[:2]  # small batches keep it fast; BatchNorm1d still sees two samples a channel in train
    steps = [(x, "train"), (x.flip(0), "train"), (x, "train"), (x, "eval"), (x[:1], "eval")]
    first = next(iter(default_layers(model)))
    h, oracle = run_recorded(model, steps, units={first: [0, 1]})
    assert_matches(h, oracle)


# --- 2. generated networks --------------------------------------------------------------------------------------
FUNCS = {"relu": F.relu, "affine": lambda x: x * 2 + 1, "tanh": torch.tanh, "relu_": F.relu_}


class GenNet(nn.Module):
    """A network run from a plan: ("m", i) calls module i, ("twice", i) calls it twice in a row, ("f", name)
    a functional op, ("res", ops) adds ops(x) to x, ("cat", a, b) concatenates two branches along the
    channels, ("odd", ops) runs ops on odd steps only (``odd`` is set by the loop)."""

    def __init__(self, mods: list[nn.Module], plan: list, cat_dim: int):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.plan, self.cat_dim, self.odd = plan, cat_dim, False

    def run(self, ops: list, x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            if op[0] == "m":
                x = self.mods[op[1]](x)
            elif op[0] == "twice":
                x = self.mods[op[1]](self.mods[op[1]](x))
            elif op[0] == "f":
                x = FUNCS[op[1]](x)
            elif op[0] == "res":
                x = x + self.run(op[1], x)
            elif op[0] == "cat":
                x = torch.cat([self.run(op[1], x), self.run(op[2], x)], self.cat_dim)
            elif op[0] == "odd" and self.odd:
                x = self.run(op[1], x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.plan, x)


class Case:
    """One generated network, its steps and ``record``'s arguments (not a dataclass: Hypothesis would print
    every tensor of it)."""

    def __init__(self, model: GenNet, steps: list[tuple[torch.Tensor, str]], kw: dict[str, Any]):
        self.model, self.steps, self.kw = model, steps, kw

    def __repr__(self) -> str:  # what Hypothesis prints for a failing example
        shapes = [(tuple(x.shape), m) for x, m in self.steps]
        return f"Case(plan={self.model.plan}, mods={list(self.model.mods)}, steps={shapes}, kw={self.kw})"


@st.composite
def cases(draw, layout: str, dtype: torch.dtype) -> Case:
    """A network of ``layout`` ("NC", "NLF", "NCL", "NCHW", or "NCHW-large": tensors over 65536 values,
    which the recorder reduces in their hooks rather than holding them to ``step()``), its steps and
    ``record``'s arguments."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    large = layout == "NCHW-large"
    layout = "NCHW" if large else layout
    widths = st.sampled_from([8] if large else [3, 4, 6, 8])
    mods: list[nn.Module] = []
    odd: set[int] = set()  # modules that run on odd steps only

    def add(m: nn.Module) -> int:
        mods.append(m)
        return len(mods) - 1

    def weight(cin: int, cout: int) -> nn.Module:
        bias = draw(st.booleans())
        if layout in ("NC", "NLF"):
            return nn.Linear(cin, cout, bias=bias)
        k = draw(st.sampled_from([1, 3]))
        return (nn.Conv1d if layout == "NCL" else nn.Conv2d)(cin, cout, k, padding=k // 2, bias=bias)

    def norm(c: int) -> nn.Module:
        kind = draw(st.sampled_from({"NC": "bn ln gn", "NLF": "ln", "NCL": "bn gn", "NCHW": "bn gn"}[layout].split()))
        if kind == "bn":
            bn = nn.BatchNorm2d if layout == "NCHW" else nn.BatchNorm1d
            return bn(c, affine=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, None])))
        if kind == "ln":
            return nn.LayerNorm(c, elementwise_affine=draw(st.booleans()))
        return nn.GroupNorm(draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0])), c)

    def after(i: int) -> list:
        # Right after a weight or norm layer (whose output no backward needs) an in-place op may follow.
        kind = draw(st.sampled_from(["none", "act", "inplace_module", "inplace_fn", "fn"]))
        if kind == "act":
            return [("m", add(draw(st.sampled_from([nn.ReLU, nn.GELU, nn.Sigmoid, nn.Tanh]))()))]
        if kind == "inplace_module":
            return [("m", add(nn.ReLU(inplace=True)))]
        if kind == "inplace_fn":
            return [("f", "relu_")]
        if kind == "fn":
            return [("f", draw(st.sampled_from(["relu", "affine", "tanh"])))]
        return []

    def layer(m: nn.Module) -> list:
        i = add(m)
        return [("m", i), *after(i)]

    def chain(c: int, top: bool) -> tuple[list, int]:
        ops: list = []
        kinds = ["weight", "norm", "act", "fn"] + (["res", "cat", "twice", "odd"] if top else [])
        for _ in range(draw(st.integers(1, 4 if top else 2))):
            kind = draw(st.sampled_from(kinds))
            if kind == "weight":
                c2 = draw(widths)
                ops += layer(weight(c, c2))
                c = c2
            elif kind == "norm":
                ops += layer(norm(c))
            elif kind == "act":
                ops.append(("m", add(draw(st.sampled_from([nn.ReLU, nn.GELU, nn.Sigmoid, nn.Tanh]))())))
            elif kind == "fn":
                ops.append(("f", draw(st.sampled_from(["relu", "affine", "tanh"]))))
            elif kind in ("res", "odd"):  # shape-preserving bodies
                start = len(mods)
                body = layer(weight(c, c))
                if draw(st.booleans()):
                    body += layer(norm(c))
                ops.append((kind, body))
                if kind == "odd":
                    odd.update(range(start, len(mods)))
            elif kind == "cat":
                a, b = draw(widths), draw(widths)
                left, cl = chain(c, False)  # a branch of a few layers ending in a weight layer of width a
                ops.append(("cat", [*left, *layer(weight(cl, a))], layer(weight(c, b))))
                c = a + b
            elif kind == "twice":
                shared = weight(c, c) if draw(st.booleans()) else draw(st.sampled_from([nn.ReLU, nn.Tanh]))()
                ops.append(("twice", add(shared)))
        return ops, c

    c0 = draw(widths)
    plan, c = chain(c0, True)
    if not any(True for i, m in enumerate(mods) if i not in odd for _ in m.parameters()):
        plan += layer(weight(c, draw(widths)))  # something every step trains
    model = GenNet(mods, plan, -1 if layout == "NLF" else 1).to(dtype)

    n = 8 if large else draw(st.sampled_from([2, 4, 8]))
    space = {"NC": (), "NLF": (draw(st.sampled_from([1, 3, 5])),), "NCL": (draw(st.sampled_from([3, 8])),),
             "NCHW": (33, 33) if large else (draw(st.sampled_from([3, 5])),) * 2}[layout]
    count = draw(st.integers(2, 5))
    sizes = [n] * (count - 1) + [draw(st.integers(2, n))]
    modes = [draw(st.sampled_from(["train", "train", "nograd", "eval"])) for _ in range(count)]
    scale, offset = draw(st.sampled_from([1.0, 30.0])), draw(st.sampled_from([0.0, 5.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def batch(k: int) -> torch.Tensor:
        shape = (k, *space, c0) if layout == "NLF" else (k, c0, *space)
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype)

    steps = [(batch(k), m) for k, m in zip(sizes, modes, strict=True)]

    names = list(default_layers(model))
    per_channel = draw(st.booleans())
    kw: dict[str, Any] = {"every": draw(st.integers(1, 3)), "per_channel": per_channel}
    pick = draw(st.sampled_from(["default", "subset", "glob", "mapping"]))
    if pick == "subset":
        kw["layers"] = [name for name in names if draw(st.booleans())] or names[:1]
    elif pick == "glob":
        kw["layers"] = [draw(st.sampled_from(names))[:-1] + "*"]
    elif pick == "mapping":
        chosen = [name for name in names if draw(st.booleans())] or names[-1:]
        kw["layers"] = {name: draw(st.sampled_from(["input", "output"])) for name in chosen}
    if not set(resolve_layers(model, kw.get("layers"))) - {f"mods.{i}" for i in odd}:
        # Documented: a step that trains while no hook has fired yet raises RecordingError (the torch.compile
        # guard), so step 0 must call a recorded layer: add one that runs every step.
        always = next(name for name in names if int(name.split(".")[1]) not in odd)
        if isinstance(kw["layers"], dict):
            kw["layers"][always] = "output"
        else:
            kw["layers"] = [*kw["layers"], always]
    if per_channel and draw(st.booleans()):
        watched = draw(st.sampled_from(list(resolve_layers(model, kw.get("layers")))))
        # unit 0 exists whatever the layout; 1..3 may lie beyond the channels (NaN there)
        kw["units"] = {watched: [0, *draw(st.lists(st.integers(1, 3), max_size=1))]}
        kw["quantiles"] = draw(st.sampled_from([(0.15, 0.5, 0.85), (0.0, 0.5, 1.0), (0.3,)]))
    return Case(model, steps, kw)


# Shrinking a failure takes minutes on two cores (each try trains a network), and a generated case is small
# already: CI reports the first failing case; BNAUDIT_ORACLE_SHRINK=1 asks Hypothesis for a minimal one.
PHASES = tuple(Phase) if os.environ.get("BNAUDIT_ORACLE_SHRINK") else (Phase.explicit, Phase.reuse, Phase.generate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["NC", "NLF", "NCL", "NCHW", "NCHW-large"])
@settings(max_examples=5, deadline=None, derandomize=True, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_networks_match_oracle(layout, dtype, data):
    # Layout and dtype are parameters rather than draws so that every pair is covered whatever Hypothesis's
    # preference for the first choices.
    case = data.draw(cases(layout, dtype), label="case")
    twin = copy.deepcopy(case.model)
    h, oracle = run_recorded(case.model, case.steps, **case.kw)
    assert_matches(h, oracle, per_channel=case.kw["per_channel"])  # no skipped row: in-place ops come after the hook
    run_plain(twin, case.steps)
    assert_bit_identical(case.model, twin)


# --- 3. the regression that a data_ptr-keyed cache caused --------------------------------------------------------
class FourConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(4))
        with torch.no_grad():
            for b, conv in enumerate(self.convs):
                conv.bias.fill_(float(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


def test_four_conv_chain_same_shape_records_each_layers_own_stats():
    # Each conv's output is freed once the next relu has read it, so four same-shaped outputs reuse a handful of
    # addresses: a statistic cached by address hands one layer another's numbers. Ten steps, with grad (the
    # graph keeps tensors alive) and without (it frees them at once) in turn.
    torch.manual_seed(0)
    model = FourConv()
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(8, 16, 32, 32, generator=g), "nograd" if i % 2 else "train") for i in range(10)]
    names = [f"convs.{i}" for i in range(4)]
    h, oracle = run_recorded(model, steps, layers=names)
    got = np.stack([h.series(n, "mean") for n in names], axis=1)
    ref = np.array([[r["layers"][n]["mean"] for n in names] for r in oracle.rows])
    stds = np.array([[np.sqrt(r["layers"][n]["var"]) for n in names] for r in oracle.rows])
    bad = np.abs(got - ref) > TOL.mean * (np.abs(ref) + stds) + 1e-12
    assert not bad.any(), (f"steps {np.nonzero(bad.any(1))[0].tolist()}: recorded means\n{_fmt(got[bad.any(1)][:3])}\n"
                           f"oracle\n{_fmt(ref[bad.any(1)][:3])}")
    assert_matches(h, oracle)


# --- 4. NaN and Inf -------------------------------------------------------------------------------------------------
class Poison(nn.Module):
    """Writes ``value`` into one value of channel 1 of two samples (out of place; a pair: one value each), or
    passes x through when it is None."""

    def __init__(self):
        super().__init__()
        self.value: float | tuple[float, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return x
        a, b = self.value if isinstance(self.value, tuple) else (self.value, self.value)
        x = x.clone()
        x[0, 1].view(-1)[0] = a
        x[1, 1].view(-1)[0] = b
        return x


@pytest.mark.parametrize("shape", [(8, 6), (8, 8, 33, 33)], ids=["held", "in-hook"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "whole"])
def test_nonfinite_activations_match_oracle(shape, per_channel):
    torch.manual_seed(0)
    if len(shape) == 2:
        model = nn.Sequential(nn.Linear(6, 6), Poison(), nn.BatchNorm1d(6), nn.ReLU())
    else:
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), Poison(), nn.BatchNorm2d(8), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    values = [None, float("inf"), None, (float("inf"), float("-inf")), float("nan"), None]
    steps = [(torch.randn(*shape, generator=g), "nograd") for _ in values]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with record(model, per_channel=per_channel) as rec:
        with Oracle(model, channel_dim=lambda n: rec.history.info[n]["channel_dim"]) as oracle:
            for v, (x, mode) in zip(values, steps, strict=True):
                model[1].value = v
                _step(model, opt, x, mode)
                rec.step()
                oracle.step()
    h = rec.history
    nf = h.series("2", "nonfinite_frac")
    assert nf[0] == 0 and nf[1] == 2 / x.numel() and nf[4] == 2 / x.numel()  # exact, not just close
    assert np.isposinf(h.series("2", "mean")[1]) and np.isnan(h.series("2", "mean")[3])
    assert_matches(h, oracle, per_channel=per_channel)


# --- 5. recording only reads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_recording_leaves_model_bit_identical_to_unrecorded_twin(arch):
    model, twin = arch.build().requires_grad_(True), arch.build().requires_grad_(True)
    x = arch.example()[:2]
    steps = [(x, "train"), (x, "train"), (x, "nograd"), (x[:1], "eval")]
    torch.manual_seed(1234)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with record(model) as rec:
        for x, mode in steps:
            _step(model, opt, x, mode)
            rec.step()
    run_plain(twin, steps)
    assert_bit_identical(model, twin)


# --- semantics the docstring states that the numbers alone do not show ------------------------------------------
def test_layers_listed_in_first_call_order():
    # "h.layers: recorded layer names, in first-call order": b runs before a, though defined after it.
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(x))

    torch.manual_seed(0)
    model = Reversed()
    h, oracle = run_recorded(model, [(torch.randn(4, 4), "train")] * 2)
    assert_matches(h, oracle)
    assert h.layers == oracle.order == ["b", "a"]


def test_module_called_at_two_widths_in_one_step_keeps_whole_tensor_stats():
    # One shared activation sees (N, 4) then (N, 6): "per channel" has no meaning across the two calls; the
    # recorder keeps whole-tensor summaries (one channel, count = every value of the step), which the oracle
    # computes the same way once told the layer has no channel dim.
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(3, 4), nn.Linear(4, 6), nn.Tanh()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)
    model = Shared()
    g = torch.Generator().manual_seed(0)
    h, oracle = run_recorded(model, [(torch.randn(8, 3, generator=g), "train") for _ in range(3)])
    # The layer keeps its channel dim; the steps whose calls differ in width hold whole-tensor summaries, and
    # their channel series read as NaN (no channel is the same across the two calls).
    assert h.info["act"]["channel_dim"] == 1
    assert np.isnan(h.series("act", "channel_mean")).all() and (h.series("act", "calls") == 2).all()
    assert_matches(h, oracle)


def test_updated_means_the_parameters_were_written():
    # "did any parameter change during the step (an optimizer step ran)": an SGD step on all-zero gradients
    # writes the parameters without changing them, and counts; a hand-written update through `.data` changes
    # them without moving their version counters (see below).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with record(model) as rec, Oracle(model, channel_dim=lambda n: rec.history.info[n]["channel_dim"]) as oracle:
        (model(x).sum() * 0).backward()  # zero gradients: SGD writes p - 0.1 * 0 == p
        opt.step()
        opt.zero_grad()
        rec.step(), oracle.step()
        model(x)
        for p in model.parameters():
            p.data.add_(0.1)
        rec.step(), oracle.step()
        model(x).sum().backward()
        opt.step()
        rec.step(), oracle.step()
        with torch.no_grad():
            model(x)
        rec.step(), oracle.step()
    assert [r["updated"] for r in oracle.rows] == [True, True, True, False]
    # The recorder reads parameters' version counters (nothing else is free on an accelerator), and a write
    # through ``.data`` does not move them: that step reads as not updated. A documented limitation; every
    # torch optimizer, and any in-place update under torch.no_grad(), moves them.
    assert rec.history.updated.tolist() == [True, False, True, False]
    for row in oracle.rows:
        row["updated"] = row["updated"] and row["step"] != 1
    assert_matches(rec.history, oracle)


def test_comparison_fails_when_the_oracle_is_wrong():
    # The test of the tests: beside a right oracle, one told the wrong channel dim and one whose variance is
    # the sample variance must both show differences.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU())
    x = torch.randn(4, 3, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with record(model) as rec:
        right = Oracle(model, channel_dim=lambda n: rec.history.info[n]["channel_dim"])
        wrong_dim = Oracle(model, channel_dim=lambda n: -1)
        for _ in range(2):
            _step(model, opt, x, "train")
            rec.step(), right.step(), wrong_dim.step()
        right.close(), wrong_dim.close()
    h = rec.history
    assert not any(compare(h, right).values())
    assert any(" channel_mean step " in m or "width" in m for m in compare(h, wrong_dim)["structure"] +
               compare(h, wrong_dim)["stats"])
    wrong_var = copy.deepcopy(right)
    for row in wrong_var.rows:
        for r in row["layers"].values():
            r["var"] *= r["count"] / (r["count"] - 1)
    assert any(" var step " in m for m in compare(h, wrong_var)["stats"])


def test_units_beyond_the_channels_read_as_nan():
    # A watched unit the layer does not have has no values: NaN (the recorder notes it), even when it is the
    # only one watched.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(6, 3, generator=g), "train") for _ in range(2)]
    h, oracle = run_recorded(model, steps, units={"0": [1, 7], "1": [4]})
    assert np.isnan(h.series("1", "quantiles")).all()
    assert_matches(h, oracle)
