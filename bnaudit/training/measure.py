"""What train-compare measures inside one run besides the loss and the activations: per-layer gradient norms
and, optionally, Santurkar et al. (2018)'s gradient-based internal covariate shift (the activation drift and
the Fig. 1 percentiles come from ``bnaudit.record``, see ``bnaudit.training.recorder``).

Every measurement is taken on "log steps" only (every ``log_every`` optimizer steps) so its cost stays a
small fraction of training; each log step needs one host transfer per measurement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.layers import is_norm, is_weight_layer


def tracked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose gradient norms are logged: Linear/Conv and normalization layers with parameters."""
    out = []
    for name, m in model.named_modules():
        if (is_weight_layer(m) or is_norm(m)) and any(p.requires_grad for p in m.parameters(recurse=False)):
            out.append((name, m))
    return out


class GradNorms:
    """Per-layer L2 norm of the parameter gradients (all of a layer's own parameters together)."""

    def __init__(self, model: nn.Module):
        self.layers = tracked_layers(model)
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {name: [] for name, _ in self.layers}

    def log(self, step: int) -> None:
        norms = []
        for _, m in self.layers:
            sq = [p.grad.detach().float().pow(2).sum() for p in m.parameters(recurse=False) if p.grad is not None]
            norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros(()))
        if not norms:
            return
        values = torch.stack([n.cpu() if n.device.type != "cpu" else n for n in norms]).tolist()  # one transfer
        self.steps.append(step)
        for (name, _), v in zip(self.layers, values):
            self.values[name].append(float(v))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "layers": {k: list(v) for k, v in self.values.items()}}


@dataclass
class ICS:
    """Santurkar et al. (2018) gradient-based internal covariate shift of one layer (the optimization view):
    G is the layer's weight gradient at a step; G' is its gradient on the same batch after every *preceding*
    layer took its update. Logged: ||G - G'||_2 and cos(G, G')."""

    layer: str
    steps: list[int] = field(default_factory=list)
    l2: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)

    def measure(
        self,
        step: int,
        model: nn.Module,
        shadow: nn.Module,
        optimizer: torch.optim.Optimizer,
        forward_loss: Callable[[nn.Module], torch.Tensor],
        rng_state: torch.Tensor,
    ) -> None:
        """Call after ``backward()`` and before ``optimizer.step()``.

        ``shadow`` is a hook-free copy of the model's structure (so the recorder never sees these passes):
        it receives the current weights and gradients, an optimizer with the current state takes the step for
        the preceding layers only, and the same batch is run again with the same dropout masks.
        """
        target = dict(model.named_modules())[self.layer]
        if target.weight.grad is None:
            return
        g = target.weight.grad.detach().clone()
        order = [n for n, _ in model.named_modules()]
        cut = order.index(self.layer)
        before = {n for n in order[:cut]}
        shadow.load_state_dict(model.state_dict())
        shadow.train(model.training)
        src = dict(model.named_parameters())
        moving = []
        for name, p in shadow.named_parameters():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            q = src[name]
            # optimizers skip parameters whose grad is None: only the preceding layers take their update
            p.grad = q.grad.detach().clone() if owner in before and q.grad is not None else None
            if p.grad is not None:
                moving.append(name)
        opt2 = type(optimizer)(shadow.parameters(), **optimizer.defaults)
        opt2.load_state_dict(optimizer.state_dict())
        with torch.no_grad():
            opt2.step()
        for p in shadow.parameters():
            p.grad = None
        cpu_state = torch.get_rng_state()
        torch.set_rng_state(rng_state)  # the same dropout masks as the step being measured
        try:
            forward_loss(shadow).backward()
        finally:
            torch.set_rng_state(cpu_state)
        g2 = dict(shadow.named_modules())[self.layer].weight.grad
        if g2 is None:
            return
        diff = (g - g2).norm()
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g2.flatten(), dim=0)
        vals = torch.stack([diff, cos]).cpu().tolist()
        self.steps.append(step)
        self.l2.append(float(vals[0]))
        self.cosine.append(float(vals[1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "view": "optimization (Santurkar et al. 2018)",
            "layer": self.layer,
            "steps": list(self.steps),
            "l2": list(self.l2),
            "cosine": list(self.cosine),
        }


def check_ics_layer(model: nn.Module, layer: str) -> None:
    """Raise UsageError unless ``layer`` names a module with a ``weight`` parameter."""
    m = dict(model.named_modules()).get(layer)
    if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
        names = [n for n, mm in model.named_modules() if is_weight_layer(mm)]
        raise UsageError(
            f"--ics-layer {layer!r} is not a layer with weights in this model; choose one of {', '.join(names[:8])}"
        )
