"""``bnaudit.inspect`` leaves the caller's global random state exactly as it was: torch's generator, Python's
``random`` and NumPy's, with an inferred example input and with a shuffling DataLoader that draws its order
from torch's global generator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnaudit
from tests.fixtures.architectures import mlp_bn


def _states() -> tuple[torch.Tensor, object, tuple]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _same(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]), "torch's global RNG moved"
    assert before[1] == after[1], "Python's random moved"
    assert before[2][0] == after[2][0] and np.array_equal(before[2][1], after[2][1]) and before[2][2:] == after[2][2:]


@pytest.fixture(scope="module")
def cancer() -> TensorDataset:
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


def _cancer_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def test_inspect_without_data_leaves_the_global_rng_alone():
    model = mlp_bn()
    torch.manual_seed(123)
    before = _states()
    report = bnaudit.inspect(model)
    _same(before, _states())
    assert report.meta["example_input"].startswith("random, inferred")


def test_inferred_example_is_seeded_so_two_audits_agree():
    first = bnaudit.inspect(mlp_bn()).to_dict()
    torch.manual_seed(999)  # a different global state must not change what is audited
    second = bnaudit.inspect(mlp_bn()).to_dict()
    assert first["findings"] == second["findings"] and first["layers"] == second["layers"]


def test_inspect_on_a_shuffling_loader_without_generator_leaves_the_global_rng_alone(cancer):
    loader = DataLoader(cancer, batch_size=32, shuffle=True)  # RandomSampler with no generator of its own
    model = _cancer_mlp()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = _states()
    report = bnaudit.inspect(model, loader, steps=4)
    _same(before, _states())
    assert report.rules_run  # the dynamic probes read the loader
    assert report.meta["data"]
    # and the user's next epoch is the one it would have been without the audit
    torch.manual_seed(7)
    expected = [b[1].tolist() for b in loader][:3]
    torch.manual_seed(7)
    bnaudit.inspect(model, loader, steps=4)
    assert [b[1].tolist() for b in loader][:3] == expected


def test_transforms_with_an_inferred_example_leave_the_global_rng_alone():
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    torch.manual_seed(5)
    before = _states()
    first = bnaudit.insert_bn(model, infer_example=True)
    _same(before, _states())
    again = bnaudit.insert_bn(model, infer_example=True)  # the seeded example gives the same new model
    assert [c.layer for c in first.changes] == [c.layer for c in again.changes] and first.changes
    assert type(first.model[0][1]) is nn.BatchNorm1d  # the inferred example told insert_bn the input rank
    for (k, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
