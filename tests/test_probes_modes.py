"""The eval-mode and running-statistics probes (bnaudit.probes) on real small models: each experiment's
numbers against a direct computation, the model and the global RNG untouched afterwards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.probes import common as PC
from bnaudit.probes import eval_steps as PE
from bnaudit.probes import inference as PI
from bnaudit.probes import running_stats as PR
from bnaudit.probes import train_eval as PT
from bnaudit.rules import examples_modes as R


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
    )


def _assert_same(model: nn.Module, saved) -> None:
    state, flags = saved
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: m.training for n, m in model.named_modules()} == flags


def _batches(x: torch.Tensor, size: int = 32):
    return [x[i : i + size] for i in range(0, len(x), size)]


# --- input helpers ------------------------------------------------------------------------------------------


def test_take_and_concat_follow_the_batch_dimension():
    x = torch.arange(12.0).reshape(6, 2)
    mask = torch.ones(3)  # not per-sample: passed through
    inputs = (x, {"ids": torch.arange(6), "mask": mask})
    assert PC.batch_size(inputs) == 6
    picked = PC.take(inputs, [4, 0])
    assert torch.equal(picked[0], x[[4, 0]])
    assert torch.equal(picked[1]["ids"], torch.tensor([4, 0]))
    assert picked[1]["mask"] is mask
    joined = PC.concat([PC.take(inputs, [0, 1]), PC.take(inputs, [2])])
    assert torch.equal(joined[0], x[:3])
    with pytest.raises(ValueError):
        PC.concat([x, (x, x)])


# --- BN301: co-batch invariance --------------------------------------------------------------------------------


def test_cobatch_predict_without_eval_depends_on_the_batch():
    model = R.trained_mlp()
    x, _ = R.digits()
    saved, rng = _state(model), torch.get_rng_state()
    res = PI.cobatch_invariance(model, _batches(x[:64]), R.predict_no_eval)
    assert res.used_predict and res.compared == (8, 8)
    assert res.relative > 1e-2 and res.max_abs_delta > 0
    assert res.train_mode_layers == ("1", "4") and res.batch_stat_layers == ("1", "4")
    assert "Expected more than 1 value per channel" in (res.single_sample_error or "")
    _assert_same(model, saved)
    assert torch.equal(torch.get_rng_state(), rng)


def test_cobatch_predict_with_eval_is_invariant():
    model = R.trained_mlp()
    x, _ = R.digits()
    res = PI.cobatch_invariance(model, _batches(x[:64]), R.predict_eval)
    assert res.compared == (8, 8, 1)
    assert res.relative < 1e-5 and res.single_sample_error is None
    assert res.batch_stat_layers == () and res.train_mode_layers == ()


def test_cobatch_names_untracked_layers_and_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Dropout(0.5), nn.Linear(6, 2)
    )
    res = PI.cobatch_invariance(model, [torch.randn(20, 5)], lambda m, x: m(x))  # no eval(): dropout active too
    assert res.untracked_layers == ("1",) and res.active_dropout == ("2",)
    res_eval = PI.cobatch_invariance(model, [torch.randn(20, 5)])  # eval forward: still batch statistics
    assert res_eval.untracked_layers == ("1",) and res_eval.active_dropout == () and res_eval.relative > 1e-3


class _BatchCentered(nn.Module):
    """Subtracts the batch mean: batch-dependent without any BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0, keepdim=True))


def test_cobatch_catches_batch_mixing_without_batchnorm():
    torch.manual_seed(0)
    res = PI.cobatch_invariance(_BatchCentered(), [torch.randn(16, 4) * 3])
    assert res.relative > 1e-2 and res.batch_stat_layers == ()


def test_cobatch_needs_two_samples():
    res = PI.cobatch_invariance(R.trained_mlp(), [torch.rand(1, 64)])
    assert res.note and res.relative == 0


# --- BN306: buffers around predict -----------------------------------------------------------------------------


def test_predict_mutations_finds_leaking_statistics():
    model = R.trained_mlp()
    x, _ = R.digits()
    saved = _state(model)
    nbt = int(model[1].num_batches_tracked)
    res = PI.predict_mutations(model, _batches(x[:96]), R.predict_no_eval)
    assert res.calls == 2 and res.samples == 64
    layers = {c.layer: c for c in res.changes}
    assert set(layers) == {"1", "4"}
    assert layers["1"].num_batches_tracked == (nbt, nbt + 2)
    assert set(layers["1"].buffers) == {"running_mean", "running_var", "num_batches_tracked"}
    assert layers["1"].max_abs_delta > 0
    _assert_same(model, saved)
    assert PI.predict_mutations(model, _batches(x[:96]), R.predict_eval).changes == ()
    assert PI.predict_mutations(model, _batches(x[:96])).changes == ()


def test_predict_mutations_without_batches_says_so():
    model = R.trained_mlp()
    for predict in (None, R.predict_no_eval):
        res = PI.predict_mutations(model, [], predict)
        assert (res.calls, res.samples, res.changes, res.note) == (0, 0, (), "no batches")
        assert res.used_predict is (predict is not None)


def test_buffer_hashes_see_any_change():
    bn = nn.BatchNorm1d(3)
    before = PC.buffer_hashes(bn)
    bn.running_var[1] += 1e-7
    after = PC.buffer_hashes(bn)
    assert before["running_var"] != after["running_var"] and before["running_mean"] == after["running_mean"]


# --- BN302/BN303: z and r --------------------------------------------------------------------------------------


def test_fit_matches_a_direct_computation_nc_and_nchw():
    gen = torch.Generator().manual_seed(0)
    bn1 = nn.BatchNorm1d(4)
    bn1.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    bn1.running_var.copy_(torch.tensor([1.0, 4.0, 0.5, 2.0]))
    bn1.num_batches_tracked.fill_(7)
    x = torch.randn(96, 4, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 0.5]) + torch.tensor([0.5, 1.0, 0.0, -1.0])
    batches = _batches(x, 32)
    res = PR.running_stats_fit(bn1, batches)
    layer = res.layers[""]
    xs = [b.double().numpy() for b in batches]
    m = np.mean([b.mean(0) for b in xs], axis=0)
    v = np.mean([b.var(0, ddof=1) for b in xs], axis=0)
    rm, rv, eps = bn1.running_mean.double().numpy(), bn1.running_var.double().numpy(), bn1.eps
    assert layer.z == pytest.approx(np.mean(np.abs(m - rm) / np.sqrt(rv + eps)), rel=1e-9)
    assert layer.r == pytest.approx(np.mean((v + eps) / (rv + eps)), rel=1e-9)
    assert layer.z_max == pytest.approx(np.max(np.abs(m - rm) / np.sqrt(rv + eps)), rel=1e-9)
    assert (layer.calls, layer.samples, layer.num_batches_tracked, layer.at_init) == (3, 96, 7, False)
    assert res.batches == 3 and res.samples == 96
    assert int(bn1.num_batches_tracked) == 7  # the probe worked on a copy

    bn2 = nn.BatchNorm2d(3)
    imgs = torch.randn(16, 3, 5, 5, generator=gen) * 2 + 1
    fit2 = PR.running_stats_fit(bn2, [imgs[:8], imgs[8:]]).layers[""]
    xs = [b.double().permute(1, 0, 2, 3).reshape(3, -1).numpy() for b in (imgs[:8], imgs[8:])]
    m = np.mean([b.mean(1) for b in xs], axis=0)
    v = np.mean([b.var(1, ddof=1) for b in xs], axis=0)
    assert fit2.at_init and fit2.samples == 2 * 8 * 25
    assert fit2.z == pytest.approx(np.mean(np.abs(m) / np.sqrt(1 + bn2.eps)), rel=1e-9)
    assert fit2.r == pytest.approx(np.mean((v + bn2.eps) / (1 + bn2.eps)), rel=1e-9)


def test_fit_separates_matching_from_shifted_data_and_skips_single_samples():
    model = R.trained_mlp()
    saved = _state(model)
    x, _ = R.digits()
    xs, _ = R.shifted_digits()
    same = PR.running_stats_fit(model, _batches(x[:256]))
    shifted = PR.running_stats_fit(model, [*_batches(xs[:256]), xs[:1]])
    assert same.layers["1"].z < 0.25 and 0.7 < same.layers["1"].r < 1.4
    assert shifted.layers["1"].z > 1.0 and shifted.layers["1"].r > 2.0
    assert shifted.skipped and shifted.batches == 8
    _assert_same(model, saved)


def test_fit_keeps_dropout_off():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.BatchNorm1d(6))
    x = torch.randn(64, 6)
    with_dropout = PR.running_stats_fit(net, [x]).layers["2"]
    without = PR.running_stats_fit(nn.Sequential(net[0], nn.Identity(), net[2]), [x]).layers["2"]
    assert with_dropout.z == pytest.approx(without.z) and with_dropout.r == pytest.approx(without.r)


# --- BN304: train vs eval --------------------------------------------------------------------------------------


def test_gap_metrics():
    model = R.ema_params_only()
    x, y = R.digits()
    from bnaudit.loading.data import Batch

    ce = PT.train_eval_gap(model, [Batch(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)])
    assert ce.metric == "cross_entropy" and ce.batches == 4 and ce.samples == 128
    assert ce.eval_value > 3 * ce.train_value and ce.train_accuracy > ce.eval_accuracy
    plain = PT.train_eval_gap(model, _batches(x[:64]))
    assert plain.metric == "output" and plain.relative_change > 0.5
    target = torch.randn(32, 10)
    mse = PT.train_eval_gap(model, [Batch(x[:32], target)])
    assert mse.metric == "mse"
    good = PT.train_eval_gap(R.ema_with_update_bn(), [Batch(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)])
    assert good.eval_value < 1.5 * good.train_value


# --- BN305: frozen layers --------------------------------------------------------------------------------------


def test_frozen_bn_drift_and_train_override():
    model = R.frozen_backbone()
    saved = _state(model)
    x, _ = R.digits()
    res = PT.frozen_bn_drift(model, x[:32])
    assert res.forward_ran and res.frozen_total == 2 and res.trainable_params == 32 * 10 + 10
    layer = {f.layer: f for f in res.layers}["backbone.1"]
    assert layer.training_now and layer.training_after_train and layer.moved
    assert layer.mean_shift > 0 and layer.var_ratio > 1
    assert layer.num_batches_tracked[1] == layer.num_batches_tracked[0] + 1
    _assert_same(model, saved)
    assert PT.frozen_bn_drift(R.frozen_backbone_kept_eval(), x[:32]).layers == ()
    static = PT.frozen_bn_drift(model.eval())  # eval now, but model.train() would put them in train mode
    assert {f.layer for f in static.layers} == {"backbone.1", "backbone.4"} and not static.forward_ran
    assert all(not f.training_now and f.training_after_train for f in static.layers)


# --- BN307: eval-mode steps ------------------------------------------------------------------------------------


def test_eval_mode_steps_needs_the_counter_to_stall():
    steps = [0, 1, 2, 3, 4, 5]
    training = {"a": [1, 1, 0, 0, 0, 1], "b": [1, 1, 0, 0, 0, 1], "c": [1, 1, 0, 0, 0, 1], "d": [1] * 6}
    grads = {"a": [1] * 6, "b": [0] * 6, "c": [1] * 6, "d": [1] * 6}
    counts = {"a": [1, 2, 3, 3, 3, 4], "b": [1, 2, 3, 3, 3, 4], "c": [-1] * 6, "d": [1, 2, 3, 4, 5, 6]}
    updated = [1, 1, 1, 1, 0, 1]
    spans = PE.eval_mode_steps(steps, training, grads, counts, updated)
    assert [s.layer for s in spans] == ["a"]  # b is frozen, c has no statistics, d trains
    a = spans[0]
    # step 2: validation switched to eval after a train-mode forward (counter advanced) -> not counted;
    # step 4: no optimizer step -> not counted
    assert a.steps == (3,) and a.stalled_at == 3 and a.confirmed and a.trained_steps == 5
    no_counter = PE.eval_mode_steps(steps, {"a": training["a"]}, {"a": grads["a"]})
    assert no_counter[0].steps == (2, 3, 4) and not no_counter[0].confirmed


def test_history_eval_mode_steps_reads_a_recorded_run():
    _, history = R._recorded_run(False)
    spans = PE.history_eval_mode_steps(history)
    assert {s.layer for s in spans} == {"1", "4"}
    span = spans[0]
    assert span.first == 16 and span.last == 39 and len(span.steps) == 24 and span.confirmed
    assert PE.history_eval_mode_steps(R._recorded_run(True)[1]) == []
    with pytest.raises(TypeError):
        PE.history_eval_mode_steps({"not": "a history"})


def test_probes_leave_a_deep_copy_equal():
    model = R.trained_mlp()
    twin = copy.deepcopy(model)
    x, _ = R.digits()
    PI.cobatch_invariance(model, _batches(x[:64]), R.predict_no_eval)
    PI.predict_mutations(model, _batches(x[:64]), R.predict_no_eval)
    PR.running_stats_fit(model, _batches(x[:64]))
    PT.train_eval_gap(model, _batches(x[:64]))
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k
