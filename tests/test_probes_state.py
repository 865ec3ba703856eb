"""ModelState (bnaudit.probes.state) puts back whatever an experiment moves, and an audit copies the user's
model once and runs every experiment on that copy: the copies and forward passes of ``inspect --data`` are
counted on a real model, and the model a hostile predict() rewrites is put back exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.probes import inference as PI
from bnaudit.probes.state import ModelState
from bnaudit.rules import examples_modes as R


def _exact(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], list[bool]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_exact(model: nn.Module, saved) -> None:
    state, flags, grads = saved
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device and torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads


def test_restoring_undoes_what_a_hostile_predict_does():
    model = R.trained_mlp().eval()
    saved = _exact(model)
    bn = model[1]
    buffer_object = bn.running_mean
    state = ModelState(model)
    with pytest.raises(RuntimeError, match="after the damage"), state.restoring():
        model.train()  # modes
        model(torch.randn(16, 64))  # running statistics and the counter move (no version bump for the stats)
        with torch.no_grad():
            model[0].weight.mul_(3.0)  # a parameter changed in place
        model[6].bias.data = model[6].bias.data.double()  # a parameter converted
        model.requires_grad_(False)
        bn.running_var = torch.zeros(32)  # a buffer replaced by another tensor
        raise RuntimeError("after the damage")
    _assert_exact(model, saved)
    assert bn.running_mean is buffer_object  # the same objects, not look-alikes: the audit's references hold
    assert bn.running_var.dtype == torch.float32 and model[6].bias.dtype == torch.float32


def test_restore_is_repeatable_and_refuses_another_models_state():
    model = R.trained_mlp()
    saved = _exact(model)
    state = ModelState(model)
    for _ in range(2):
        with state.restoring():
            with torch.no_grad():
                model[0].weight.add_(1.0)
            model(torch.randn(8, 64))
        _assert_exact(model, saved)
    with pytest.raises(ValueError, match="another model"):
        PI.cobatch_invariance(R.trained_mlp(), [torch.rand(16, 64)], state=state)


class _Counted(nn.Module):
    """A small CNN with BatchNorm that counts its deep copies and its forward calls (and their batch sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 3),
        )
        self.log = {"copies": 0, "calls": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log["calls"].append(int(x.shape[0]))
        return self.net(x)

    def __deepcopy__(self, memo):
        self.log["copies"] += 1
        clone = _Counted.__new__(_Counted)
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            object.__setattr__(clone, k, v if k == "log" else copy.deepcopy(v, memo))
        return clone


def test_inspect_copies_once_and_runs_a_bounded_number_of_forwards():
    torch.manual_seed(0)
    model = _Counted()
    saved = _exact(model)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    report = bnaudit.inspect(model, images, graph="hooks")
    _assert_exact(model, saved)
    assert not [c for c, why in report.rules_skipped.items() if "internal error" in why]
    assert model.log["copies"] == 1
    # graph 4, data probe 4, train-mode pass 4, BN304's eval pass 4, co-batches 2 + 2 + 1, BN306's eval pass 4
    assert len(model.log["calls"]) <= 8 and sum(model.log["calls"]) <= 25, model.log["calls"]
