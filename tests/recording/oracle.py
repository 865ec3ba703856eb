"""A naive reference recorder for ``bnaudit.record``, the judge its rewrites are compared with step by step:
plain forward hooks (pre-hooks for layers measured on their input) registered after the recorder's, so they
fire right after it on the same tensor; each call's tensor is copied to float64 on the spot, and every
statistic is computed at the end of the step from those copies by its textbook formula, in float64. It is
short and slow on purpose: nothing here may be clever enough to share a bug with the code it judges."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnaudit.recording import default_layers

NAN = float("nan")
AMBIGUOUS = "ambiguous"


def expected_channel_dim(module: nn.Module, ndim: int) -> int | None | str:
    """The channel dimension that a tensor's layout alone decides (normalised to ``0..ndim-1``), or
    ``AMBIGUOUS`` where only the context does (an activation on a 3-D or 4-D tensor)."""
    if ndim < 2:
        return None
    if ndim == 2:
        return 1
    if isinstance(module, (_ConvNd, _BatchNorm, nn.GroupNorm)):
        return 1
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return ndim - 1
    return AMBIGUOUS


def resolve_layers(model: nn.Module, layers: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """Layer name -> "input"/"output", as the ``layers=`` argument of ``record`` documents it."""
    defaults = default_layers(model)
    if layers is None:
        return dict(defaults)
    if isinstance(layers, Mapping):
        items = list(layers.items())
    else:
        items = [(p, None) for p in ([layers] if isinstance(layers, str) else layers)]
    out: dict[str, str] = {}
    for pattern, where in items:
        for name, _ in model.named_modules():
            if name and (name == pattern or fnmatch.fnmatchcase(name, pattern)):
                out[name] = where or defaults[name]
    return out


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0:
        return x
    return None


def _rows(x: torch.Tensor, cd: int | None) -> torch.Tensor:
    """``x`` as (values per channel, channels): channel ``cd`` last, everything else flattened."""
    if cd is None or x.dim() < 2:
        return x.reshape(-1, 1)
    return x.movedim(cd, -1).reshape(-1, x.shape[cd])


def layer_row(xs: list[torch.Tensor], cd: int | None, units: Sequence[int], qs: Sequence[float]) -> dict[str, Any]:
    """One layer's statistics for one step, from the float64 copies of its calls. Channel statistics (and
    ``count``) are None when calls of different widths leave "per channel" undefined."""
    if not xs:
        return {"calls": 0, "count": 0, "mean": NAN, "var": NAN, "std": NAN, "min": NAN, "max": NAN,
                "zero_frac": NAN, "nonfinite_frac": NAN, "channel_mean": None, "channel_var": None,
                "channel_std": None, "quantiles": torch.full((len(qs), len(units)), NAN, dtype=torch.float64)}
    v = torch.cat([x.reshape(-1) for x in xs])
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    row = {
        "calls": len(xs),
        "mean": mean.item(),
        "var": var.item(),
        "std": var.sqrt().item(),
        "min": v.min().item(),
        "max": v.max().item(),
        "zero_frac": (v == 0).sum().item() / v.numel(),
        "nonfinite_frac": (~torch.isfinite(v)).sum().item() / v.numel(),
    }
    per_call = [_rows(x, cd) for x in xs]
    if len({r.shape[1] for r in per_call}) == 1:
        m = torch.cat(per_call)
        cmean = m.mean(0)
        cvar = ((m - cmean) ** 2).mean(0)
        row.update(count=m.shape[0], channel_mean=cmean, channel_var=cvar, channel_std=cvar.sqrt())
    else:
        row.update(count=None, channel_mean=None, channel_var=None, channel_std=None)
    first = per_call[0]
    q = torch.full((len(qs), len(units)), NAN, dtype=torch.float64)
    for j, u in enumerate(units):
        if u < first.shape[1]:  # a unit beyond the layer's channels has no values: NaN
            q[:, j] = torch.quantile(first[:, u], torch.tensor(qs, dtype=torch.float64))
    row["quantiles"] = q
    return row


def bn_row(m: _BatchNorm) -> dict[str, Any]:
    """A BatchNorm layer's buffers and modes as they are now (the end of a step)."""
    def copy(t):
        return None if t is None else t.detach().to(torch.float64).clone()
    nbt = m.num_batches_tracked
    return {
        "running_mean": copy(m.running_mean),
        "running_var": copy(m.running_var),
        "num_batches_tracked": -1 if nbt is None else int(nbt),
        "training": m.training,
        "requires_grad": any(p is not None and p.requires_grad for p in (m.weight, m.bias)),
    }


class Oracle:
    """Hooks ``model`` like ``record(model, layers=..., every=..., units=..., quantiles=...)`` would and keeps
    one row per recorded step in ``rows``: ``{"step", "updated", "layers": {name: layer_row},
    "bns": {name: bn_row}}``.

    Args:
        channel_dim: name -> the channel dim the recorder declares for that layer (``h.info[name]
            ["channel_dim"]``), asked at each step end; None means one channel (the whole tensor).
    """

    def __init__(self, model: nn.Module, *, channel_dim: Callable[[str], int | None],
                 layers: Iterable[str] | Mapping[str, str] | None = None, every: int = 1,
                 units: Mapping[str, int | Sequence[int]] | None = None,
                 quantiles: Sequence[float] = (0.15, 0.5, 0.85)):
        self.model, self.every, self.channel_dim = model, every, channel_dim
        self.where = resolve_layers(model, layers)
        self.units = {k: [v] if isinstance(v, int) else list(v) for k, v in (units or {}).items()}
        self.qs = [float(q) for q in quantiles]
        self.bns = {n: m for n, m in model.named_modules() if n and isinstance(m, _BatchNorm)}
        self.calls: dict[str, list[torch.Tensor]] = {n: [] for n in self.where}
        self.first_seen: dict[str, tuple[nn.Module, int]] = {}  # layer -> (module, ndim) of its first call
        self.shapes: dict[str, set[tuple[int, ...]]] = {n: set() for n in self.where}  # every call's shape
        self.order: list[str] = []  # layers in first-call order over the recorded steps
        self.rows: list[dict[str, Any]] = []
        self.step_no = 0
        self.params = self._params()
        named = dict(model.named_modules())
        self.handles = []
        for name, where in self.where.items():
            m = named[name]
            if where == "input":
                self.handles.append(m.register_forward_pre_hook(
                    lambda mod, args, n=name: self._grab(n, mod, args)))
            else:
                self.handles.append(m.register_forward_hook(
                    lambda mod, args, out, n=name: self._grab(n, mod, out)))

    def _grab(self, name: str, module: nn.Module, x: Any) -> None:
        x = _first_tensor(x)
        if x is None or self.step_no % self.every:
            return
        self.calls[name].append(x.detach().to(torch.float64).clone())
        self.shapes[name].add(tuple(x.shape))
        if name not in self.first_seen:
            self.first_seen[name] = (module, x.dim())
            self.order.append(name)

    def _params(self) -> list[tuple[torch.Tensor, int]]:
        return [(p.detach().clone(), p._version) for p in self.model.parameters()]

    def step(self) -> None:
        """End of one step (call it right after ``rec.step()``)."""
        # "updated": the parameters were written during the step, by an optimizer or by hand: a value changed,
        # or an in-place write moved a version counter (an optimizer step on zero gradients, or one that rounds
        # to no change in bfloat16, still ran; a write through ``.data`` moves no counter but changes values).
        now = self._params()
        updated = any(not torch.equal(a, b) or u != v for (a, u), (b, v) in zip(self.params, now, strict=True))
        self.params = now
        if self.step_no % self.every == 0:
            layers = {}
            for name, xs in self.calls.items():
                cd = self.channel_dim(name) if xs else None
                layers[name] = layer_row(xs, cd, self.units.get(name, []), self.qs)
            self.rows.append({"step": self.step_no, "updated": updated, "layers": layers,
                              "bns": {n: bn_row(m) for n, m in self.bns.items()}})
        self.calls = {n: [] for n in self.where}
        self.step_no += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
