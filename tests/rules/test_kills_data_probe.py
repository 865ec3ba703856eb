"""Edge cases of the data probe (probes/data.py) that the mutation check (`tools/mutation.py`,
`docs/mutation.md`) found unpinned: each test decides a behaviour that a plausible one-token change would alter
(an evidence value against a naive recomputation, an edge path). Real small models, real or exactly constructed
data. The BN2xx rules themselves: test_kills_data.py."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.loading.data import Batch
from bnaudit.probes.data import run_data_probe
from bnaudit.rules import examples_data as XD
from tests.rules.kills import seeded_randn


# --- the data probe ---------------------------------------------------------------------------------------------
class _KeywordBN(nn.Module):
    """Calls its BatchNorm with a keyword argument: the pre-hook sees no positional input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(input=self.lin(x))


def test_probe_runs_a_batchnorm_called_with_a_keyword_input():
    probe = run_data_probe(_KeywordBN(), [Batch(seeded_randn(8, 4))])
    assert probe.errors == {} and probe.batch_sizes == [8]
    assert "bn" not in probe.zero_positions  # nothing to see without a positional input


def test_probe_records_the_models_own_error_for_a_batch_it_rejects():
    probe = run_data_probe(XD.mlp_bn(), [Batch(seeded_randn(8, 4)), Batch(seeded_randn(1, 4)), Batch(seeded_randn(8, 4))])
    assert probe.batch_sizes == [8, 8] and list(probe.errors) == [1]
    assert probe.errors[1].startswith("ValueError: Expected more than 1 value per channel when training")
    # a 1-D input is the BatchNorm's own error too (not the probe's hook failing on it)
    one_d = run_data_probe(nn.Sequential(nn.BatchNorm1d(4)), [Batch(seeded_randn(8, 4)[:, 0])])
    assert one_d.errors[0].startswith("ValueError: expected 2D or 3D input")


def test_probe_spatial_and_zero_samples_of_one_image_of_one_channel():
    x = torch.ones(1, 1, 2, 3)
    x[0, 0, 0, 1] = 0.0
    probe = run_data_probe(nn.Sequential(nn.BatchNorm2d(1)), [Batch(x)])
    assert probe.errors == {} and probe.spatial == {"0": 6}
    np.testing.assert_array_equal(probe.zero_samples["0"], [1 / 6])


def test_probe_zero_samples_of_images_against_a_naive_count():
    x = torch.rand(3, 2, 4, 5, generator=torch.Generator().manual_seed(0)) + 0.5
    x[0, :, 0, :] = 0.0  # 5 of 20 positions of sample 0
    x[2, :, 1:3, 1:4] = 0.0  # 6 of 20 of sample 2
    x[1, 0, :, :] = 0.0  # one channel only: not a zero position
    probe = run_data_probe(nn.Sequential(nn.BatchNorm2d(2)), [Batch(x)])
    np.testing.assert_array_equal(probe.zero_samples["0"], [5 / 20, 0.0, 6 / 20])
    assert probe.zero_positions == {"0": 11 / 60} and probe.spatial == {"0": 20}


class _Shifted(nn.Module):
    """ReLU of ``x + shift``: a unit is active where the shifted input is positive."""

    def __init__(self, shift: list[float]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.shift)


def test_probe_dead_units_accumulate_over_batches_and_count_small_positive_outputs():
    # unit 0: positive (0.5) only in the first batch; unit 1: always 0.25; unit 2: never positive
    first = torch.tensor([[0.5, 0.25, -1.0]]).repeat(4, 1)
    second = torch.tensor([[-0.5, 0.25, -1.0]]).repeat(4, 1)
    probe = run_data_probe(_Shifted([0.0, 0.0, 0.0]), [Batch(first), Batch(second)])
    assert probe.dead == {"act": (1, 3)}


def test_probe_targets_as_class_labels():
    def labels(*targets):
        return run_data_probe(XD.mlp(), [Batch(seeded_randn(len(t), 4), t) for t in targets]).targets

    got = labels(torch.tensor([0.0, 2.0, 1.0, 2.0]), torch.tensor([True, False, True, True]))
    assert [list(t) for t in got] == [[0, 2, 1, 2], [1, 0, 1, 1]] and got[1].dtype == np.int64
    assert labels(torch.arange(150) % 150) is not None  # integer labels: any number of classes
    assert labels(torch.arange(100).double()) is not None  # 100 distinct whole floats: still classes
    assert labels(torch.arange(101).double()) is None  # 101: a regression target
    assert labels(torch.tensor([0.5, 1.0, 2.0])) is None  # not whole numbers
    assert labels(torch.zeros(4, 1, dtype=torch.long)) is None  # not one label per sample
    assert [list(t) for t in labels(torch.tensor([3]))] == [[3]]  # a batch of one still has its label
    # a batch without labels ends the record, even when later batches have labels again
    assert labels(torch.tensor([0, 1]), torch.zeros(2, 3), torch.tensor([1, 0])) is None


def test_probe_input_moments_cover_every_batch():
    a, b = seeded_randn(8, 4), seeded_randn(8, 4, seed=1) + 3.0
    probe = run_data_probe(XD.mlp(), [Batch(a), Batch(b)])
    both = torch.cat([a, b]).double()
    np.testing.assert_allclose(probe.input["mean"], both.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(probe.input["std"], both.std(0, unbiased=False).numpy(), rtol=1e-5)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.lin(xs[0] + xs[1])


def test_probe_takes_inputs_that_are_not_one_tensor():
    probe = run_data_probe(_TwoInputs(), [Batch([seeded_randn(8, 4), seeded_randn(8, 4, seed=1)])])
    assert probe.errors == {} and probe.batch_sizes == [8] and probe.input is None


class _ModeSpy(nn.Module):
    """Records whether it ran in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


def test_probe_runs_batchnorm_in_train_mode_and_everything_else_in_eval_mode():
    spy = _ModeSpy()
    model = nn.Sequential(nn.Linear(4, 4), spy, nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    probe = run_data_probe(model, [Batch(seeded_randn(8, 4)), Batch(seeded_randn(1, 4))])
    assert spy.modes == [False, False] and model[2].training and not model[3].training
    assert list(probe.errors) == [1]  # the batch of one fails at the train-mode BatchNorm


class _EmptySequence(nn.Module):
    """Hands its BatchNorm (no running statistics) a sequence of length 0 (the input cut to nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x[:, :, :0])


def test_probe_of_a_batchnorm_that_sees_no_position_has_no_zero_fraction():
    probe = run_data_probe(_EmptySequence(), [Batch(seeded_randn(4, 3, 5))])
    assert "bn" not in probe.zero_positions and probe.spatial == {"bn": 0}


def test_data_probe_without_a_data_source_runs_no_batch():
    from bnaudit.probes.data import data_probe

    ctx = RuleContext(model=XD.mlp_bn(), graph=None, device=torch.device("cpu"))
    probe = data_probe(ctx)
    assert probe.batch_sizes == [] and probe.order_targets is None and probe.input is None



class _CastingBN(nn.BatchNorm1d):
    """A BatchNorm that takes integer inputs and casts them itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


def test_probe_measures_zero_positions_of_float_batchnorm_inputs_only():
    tokens = torch.tensor([[0, 0, 1], [2, 0, 3], [0, 0, 0], [1, 1, 1]])
    probe = run_data_probe(nn.Sequential(_CastingBN(3, track_running_stats=False)), [Batch(tokens)])
    assert probe.errors == {} and probe.zero_positions == {} and probe.spatial == {}


class _ScalarAndPairRelu(nn.Module):
    """A ReLU over a 0-d tensor (no unit axis) and a ReLU subclass that returns (output, mask): neither output
    is a batch of units, so neither is counted."""

    class PairRelu(nn.ReLU):
        def forward(self, x: torch.Tensor):
            out = super().forward(x)
            return out, out > 0

    def __init__(self) -> None:
        super().__init__()
        self.total = nn.ReLU()
        self.pair = self.PairRelu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.pair(x)
        return out + self.total(-x.sum())


def test_probe_counts_relu_units_only_on_tensor_outputs_with_a_batch_axis():
    probe = run_data_probe(_ScalarAndPairRelu(), [Batch(seeded_randn(8, 4))])
    assert probe.errors == {} and probe.dead == {}


class _KeywordSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(input=x)


def test_probe_runs_a_sigmoid_called_with_a_keyword_input():
    probe = run_data_probe(_KeywordSigmoid(), [Batch(10 * seeded_randn(8, 4))])
    assert probe.errors == {} and probe.saturated == {}  # nothing to see without a positional input


def test_probe_summarises_float_inputs_only():
    tokens, _ = XD.padded_tokens()
    probe = run_data_probe(XD.PaddedSeq(), [Batch(tokens)])
    assert probe.errors == {} and probe.input is None  # integer token ids have no scale to judge
    # the tail hook measures float inputs only: integer inputs of a sigmoid (which promotes them) are not tallied
    counts = torch.tensor([[0, 7, 9], [12, 1, 6]])
    assert run_data_probe(nn.Sequential(nn.Sigmoid()), [Batch(counts)]).saturated == {}


