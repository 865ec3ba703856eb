"""Edge cases of the BN3xx rules' probes (probes/running_stats.py, probes/common.py, probes/state.py) that the
mutation check (`tools/mutation.py`, `docs/mutation.md`) found unpinned: each test decides a behaviour that a
plausible one-token change would alter (an evidence value against a naive recomputation, an edge path). Real small
models, real or exactly constructed data. The rules themselves: test_kills_modes.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnaudit.loading.data import Batch
from bnaudit.probes.common import (
    affine_frozen,
    affine_trained,
    batch_size,
    bn_layers,
    buffer_hashes,
    concat,
    first_output_tensor,
    sample_output,
    seeded,
    short_error,
    take,
    tracks_running_stats,
)
from bnaudit.probes.running_stats import ChannelMoments, layer_fit, running_stats_fit, train_mode_pass
from bnaudit.probes.state import ModelState, state_for
from tests.rules.kills import features


# --- probes/common.py: the user's inputs taken apart and put together ------------------------------------------
def test_batch_size_reads_the_first_tensor_with_a_batch_dimension():
    x = features(5)
    assert batch_size(x) == 5 and batch_size(x.T) == 4  # the leading size, not another
    assert batch_size((3, torch.tensor(2.0), x)) == 5  # an int and a 0-d tensor have no batch dimension
    assert batch_size({"flag": True}) is None and batch_size(torch.tensor(1.0)) is None
    assert batch_size(torch.arange(3.0)) == 3  # a 1-D tensor is a batch of scalars


def test_take_indexes_only_the_tensors_of_batch_size():
    x, mask = features(5), torch.arange(3.0)
    got, m, flag = take((x, mask, 7), [4, 0])
    assert torch.equal(got, x[[4, 0]]) and torch.equal(m, mask) and flag == 7


def test_concat_joins_batches_of_different_sizes_and_refuses_other_structures():
    a, b, c = features(2, seed=1), features(3, seed=2), features(4, seed=3)
    assert torch.equal(concat([a, b]), torch.cat([a, b]))
    assert torch.equal(concat([a, b, c]), torch.cat([a, b, c]))
    only = concat([(a, 1)])
    assert torch.equal(only[0], a) and only[1] == 1
    with pytest.raises(ValueError):
        concat([a, (b, b)])
    with pytest.raises(ValueError):
        concat([a, b, (c, c)])  # the odd one out need not be the second


def test_sample_output_takes_only_the_outputs_of_batch_size():
    logits, aux, scalar = features(3, f=2, seed=1), features(5, f=2, seed=2), torch.tensor(7.0)
    got = sample_output((logits, aux, scalar, "note"), 3, 1)
    assert got.dtype == torch.float64 and torch.equal(got, logits[1].double())
    images = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_output({"a": images, "b": logits}, 3, 2), torch.cat([images[2].reshape(-1), logits[2]]).double())
    with pytest.raises(ValueError, match="leading batch dimension of 4"):
        sample_output((logits, aux), 4, 0)


def test_first_output_tensor_skips_what_is_not_a_tensor():
    x = features(2)
    assert first_output_tensor(("text", 3, x, features(3))) is x
    assert first_output_tensor({"n": 1}) is None


def test_short_error_keeps_the_first_line():
    assert short_error(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert short_error(KeyError()) == "KeyError"
    assert short_error(RuntimeError("  \n")) == "RuntimeError"


def test_seeded_repeats_a_draw_and_restores_the_callers_stream():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded(5):
        a = torch.rand(3)
    with seeded(5, "cpu"):
        b = torch.rand(3)
    with seeded(5, torch.device("cpu")):
        c = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(torch.rand(3), expected_next)  # the user's stream was not advanced


def test_bn_layers_and_which_of_them_track_running_stats():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.InstanceNorm1d(4, track_running_stats=True), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    assert list(bn_layers(model)) == ["1", "2", "4", "5"]
    # a flag switched off after construction: the buffers are still there, but nothing tracks into them
    model[4].track_running_stats = False
    # buffers removed, flag left on: nothing to normalize with in eval mode
    model[5].running_mean = None
    assert [tracks_running_stats(model[i]) for i in (1, 2, 4, 5)] == [True, False, False, False]


def _bn_with(weight: list[float], bias: list[float]) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(len(weight))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weight))
        bn.bias.copy_(torch.tensor(bias))
    return bn


def test_affine_trained_needs_every_parameter_to_vary_across_channels():
    assert affine_trained(_bn_with([1.0, 2.0], [0.5, -0.5])) is True  # two channels are enough
    assert affine_trained(_bn_with([1.0, 2.0], [0.0, 0.0])) is False  # beta constant: an initialisation
    assert affine_trained(_bn_with([3.0, 3.0], [0.1, 0.2])) is False
    assert affine_trained(_bn_with([0.0, 0.0], [0.0, 0.0])) is False
    assert affine_trained(_bn_with([1.0], [0.5])) is False  # one channel cannot vary
    assert affine_trained(nn.BatchNorm1d(0)) is False  # no channel at all
    assert affine_trained(nn.BatchNorm1d(3, affine=False)) is None


def test_affine_frozen_needs_parameters_none_of_which_requires_grad():
    bn = nn.BatchNorm1d(3)
    assert affine_frozen(bn) is False
    bn.weight.requires_grad_(False)
    assert affine_frozen(bn) is False  # bias still trains
    bn.bias.requires_grad_(False)
    assert affine_frozen(bn) is True
    assert affine_frozen(nn.BatchNorm1d(3, affine=False)) is False  # nothing to freeze


def test_buffer_hashes_name_every_buffer_and_see_empty_and_bfloat16_ones():
    model = nn.Sequential(nn.BatchNorm1d(3))
    model.register_buffer("empty", torch.zeros(0))
    model.register_buffer("bf16", torch.ones(2, dtype=torch.bfloat16))
    model.register_buffer("nothing", None)
    before = buffer_hashes(model)
    assert set(before) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "empty", "bf16"}
    assert buffer_hashes(copy.deepcopy(model)) == before
    model.bf16.add_(1)
    after = buffer_hashes(model)
    assert after["bf16"] != before["bf16"] and after["empty"] == before["empty"]
    model.empty = torch.zeros(0, dtype=torch.float64)  # another dtype, no bytes
    assert buffer_hashes(model)["empty"] != before["empty"]


# --- probes/state.py: putting the model back -------------------------------------------------------------------
def test_restore_writes_back_in_place_and_leaves_untouched_parameters_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4))
    model.register_buffer("nothing", None)
    state = ModelState(model)
    assert state_for(model, state) is state and state_for(model, None) is not state
    with pytest.raises(ValueError):
        state_for(nn.Linear(2, 2), state)
    weight, bn = model[0].weight, model[1]
    ptrs = {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    versions = {n: p._version for n, p in model.named_parameters()}
    with state.restoring():
        model(features(8))  # train mode: the running statistics move, the parameters do not
    assert bn.num_batches_tracked == 0 and torch.all(bn.running_mean == 0)
    # written back into the same storage; an untouched parameter is not even copied (its version is unchanged)
    assert {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]} == ptrs
    assert {n: p._version for n, p in model.named_parameters()} == versions
    assert model.nothing is None and model[0].weight is weight


def test_restore_undoes_a_dtype_change_and_a_shape_change_separately():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    saved = {n: t.detach().clone() for n, t in model.state_dict().items()}
    state = ModelState(model)
    with state.restoring():
        model[0].weight.data = model[0].weight.data.half()  # dtype only
        model[1].running_var.data = model[1].running_var.data[:2]  # shape only
        model[0].bias.data = model[0].bias.data[:1]  # a parameter's shape only
        model[1].weight.data = model[1].weight.data.double()  # a parameter's dtype only
    for n, t in model.state_dict().items():
        assert t.dtype == saved[n].dtype and torch.equal(t, saved[n]), n


def test_model_state_skips_an_absent_bias_and_restores_a_flipped_requires_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3))
    state = ModelState(model)
    before = model[0].weight.detach().clone()
    with state.restoring():
        model.requires_grad_(False)
        with torch.no_grad():
            model[0].weight.mul_(2)
    assert model[0].bias is None and torch.equal(model[0].weight, before)
    assert all(p.requires_grad for p in model.parameters())
    # an experiment that swaps a parameter or a buffer object: the original objects are put back
    weight, mean = model[0].weight, model[1].running_mean
    with state.restoring():
        model[0].weight = nn.Parameter(torch.zeros(3, 4))
        model[1].running_mean = torch.ones(3)
    assert model[0].weight is weight and torch.equal(weight, before) and model[1].running_mean is mean


# --- probes/running_stats.py: the data's moments against the running buffers ----------------------------------
def test_channel_moments_average_over_calls_per_channel_of_a_sequence_input():
    # (N, C, L) with C != L: the channel axis is 1, the statistics pool the batch and the length
    a = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1)).double()
    b = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(2)).double() + 1.0
    mom = ChannelMoments()
    assert (mom.calls, mom.samples, mom.mean, mom.var) == (0, 0, None, None)
    mom.add(a)
    assert (mom.calls, mom.samples) == (1, 15)
    torch.testing.assert_close(mom.mean, a.mean((0, 2)))
    mom.add(b)
    assert (mom.calls, mom.samples) == (2, 25)
    # the cumulative average of the per-call moments, as momentum=None accumulates them
    torch.testing.assert_close(mom.mean, (a.mean((0, 2)) + b.mean((0, 2))) / 2)
    torch.testing.assert_close(mom.var, (a.var((0, 2)) + b.var((0, 2))) / 2)
    pair = ChannelMoments()
    pair.add(a[:1, :, :2])  # one sample of two positions: two values per channel are enough
    assert pair.calls == 1 and pair.samples == 2


def _buffers(bn: nn.Module, mean, var) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
    return bn


def test_layer_fit_against_a_naive_recomputation():
    x = features(16, f=3, seed=4).double()
    mom = ChannelMoments()
    mom.add(x)
    bn = _buffers(nn.BatchNorm1d(3, eps=1e-3), [0.5, -0.2, 0.0], [0.25, 0.5, 2.0])  # variances below 1 too
    fit = layer_fit("bn", bn, mom)
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    shift = (x.mean(0) - rm).abs() / (rv + 1e-3).sqrt()
    ratio = (x.var(0) + 1e-3) / (rv + 1e-3)
    assert fit.z == pytest.approx(float(shift.mean()), rel=1e-12) and fit.z_max == pytest.approx(float(shift.max()), rel=1e-12)
    assert fit.r == pytest.approx(float(ratio.mean()), rel=1e-12)
    assert (fit.r_min, fit.r_max) == (pytest.approx(float(ratio.min()), rel=1e-12), pytest.approx(float(ratio.max()), rel=1e-12))
    assert (fit.channels, fit.calls, fit.samples, fit.tracks, fit.at_init, fit.num_batches_tracked) == (3, 1, 16, True, False, 0)
    assert torch.equal(fit.mean, x.mean(0)) and torch.equal(fit.var, x.var(0))


def test_layer_fit_at_init_needs_both_buffers_at_their_initial_values():
    mom = ChannelMoments()
    mom.add(features(8, f=2))
    assert layer_fit("bn", nn.BatchNorm1d(2), mom).at_init is True
    assert layer_fit("bn", _buffers(nn.BatchNorm1d(2), [0.0, 0.0], [1.0, 2.0]), mom).at_init is False
    assert layer_fit("bn", _buffers(nn.BatchNorm1d(2), [0.0, 0.3], [1.0, 1.0]), mom).at_init is False


class _Stats(nn.Module):
    """A module with running buffers but no ``eps`` and no ``num_features`` of its own."""

    def __init__(self, mean, var) -> None:
        super().__init__()
        self.track_running_stats = True
        self.register_buffer("running_mean", torch.tensor(mean))
        self.register_buffer("running_var", torch.tensor(var))


def test_layer_fit_of_a_module_without_eps_or_num_features():
    x = features(8, f=2, seed=5).double()
    mom = ChannelMoments()
    mom.add(x)
    fit = layer_fit("s", _Stats([0.0, 1.0], [0.0, 4.0]), mom)
    assert fit.channels == 2 and fit.num_batches_tracked is None and fit.affine_trained is None
    # the default epsilon is BatchNorm's 1e-5: with a running variance of 0 it alone scales the ratio
    ratio = (x.var(0) + 1e-5) / (torch.tensor([0.0, 4.0], dtype=torch.float64) + 1e-5)
    assert fit.r == pytest.approx(float(ratio.mean()), rel=1e-12)
    none = layer_fit("s", nn.Identity(), ChannelMoments())
    assert none.channels == 0 and none.z is None and none.mean is None and none.var is None


def test_layer_fit_of_a_layer_that_keeps_no_statistics_still_reports_the_datas():
    x = features(8, f=3, seed=6).double()
    mom = ChannelMoments()
    mom.add(x)
    fit = layer_fit("bn", nn.BatchNorm1d(3, track_running_stats=False), mom)
    assert fit.tracks is False and fit.z is None and fit.r is None and fit.at_init is False
    assert torch.equal(fit.mean, x.mean(0)) and torch.equal(fit.var, x.var(0)) and fit.num_batches_tracked is None
    # moments with a mean but no variance (set by hand) give no fit rather than an error
    half = ChannelMoments()
    half.mean = x.mean(0)
    assert layer_fit("bn", nn.BatchNorm1d(3), half).z is None
    half = ChannelMoments()
    half.var = x.var(0)  # and the other way round
    assert layer_fit("bn", nn.BatchNorm1d(3), half).z is None


def test_train_mode_pass_counts_the_batches_it_ran_and_keeps_their_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    a, b = features(2, seed=1), features(5, seed=2)
    res = train_mode_pass(model, [a, features(1), torch.tensor(3.0), Batch(b)])
    assert (res.batches, res.samples) == (2, 7)
    assert res.skipped == ("a batch of 1 sample(s) (train-mode statistics need at least 2)",
                           "a batch of 0 sample(s) (train-mode statistics need at least 2)")
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = [reference(a), None, None, reference(b)]
    assert [o is None for o in res.outputs] == [e is None for e in expected]
    assert torch.equal(res.outputs[0], expected[0]) and torch.equal(res.outputs[3], expected[3])
    assert res.moments["1"].calls == 2 and res.moments["1"].samples == 7
    assert not model.training and model[1].num_batches_tracked == 0  # put back


class _NoTensorOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> dict:
        return {"n": int(self.bn(x).shape[0])}


def test_train_mode_pass_of_a_model_without_a_tensor_output():
    res = train_mode_pass(_NoTensorOut(), [features(4)])
    assert res.outputs == [None] and res.batches == 1 and res.moments["bn"].calls == 1


class _Flexible(nn.BatchNorm1d):
    """A BatchNorm that also takes a list of tensors or a 1-D tensor (one channel), converting them itself."""

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            x = torch.cat(list(x))
        if x.dim() == 1:
            x = x[:, None]
        return super().forward(x)


class _Feeds(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.bn = _Flexible(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        col = x[:, :1]
        if self.how == "list":
            return self.bn([col[:2], col[2:]])
        if self.how == "flat":
            return self.bn(col[:, 0])
        if self.how == "keyword":
            return self.bn(x=col)
        return self.bn(col)


@pytest.mark.parametrize("how", ["list", "flat", "keyword"])
def test_moments_are_collected_only_from_a_positional_tensor_of_two_or_more_dimensions(how):
    res = running_stats_fit(_Feeds(how), [features(6)])
    assert res.batches == 1 and res.layers == {}  # the layer ran, but on nothing the hook can read
    assert set(running_stats_fit(_Feeds("tensor"), [features(6)]).layers) == {"bn"}


