"""Tests that pin what the mutation check (``tools/mutation.py``, ``docs/mutation.md``) found unpinned: each
decides a behaviour a plausible one-token change of the rules or probes would alter (a threshold at its edge,
an evidence value against a naive recomputation, an edge path of a probe). Real small models, real data
(sklearn digits through the rules' own example factories) or exact constructed inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.loading.data import Batch
from bnaudit.probes.common import concat
from bnaudit.probes.data import run_data_probe
from bnaudit.probes.eval_steps import eval_mode_steps
from bnaudit.probes.inference import cobatch_invariance, predict_mutations, predict_train_mode_layers
from bnaudit.probes.running_stats import ChannelMoments, running_stats_fit
from bnaudit.probes.train_eval import train_eval_gap
from bnaudit.rules import examples as X
from bnaudit.rules import examples_modes as XM
from bnaudit.rules.common import name_list
from bnaudit.rules.running_stats import _model_trained
from tests.rules.kills import features, rule_findings


# --- BN207 vanishing-or-exploding -------------------------------------------------------------------------------
def _scaled_chain(scales: list[float]) -> nn.Module:
    """Linear layers whose weights are ``scale * I``: layer k's output is x times the product of the first k+1
    scales, so every second moment is known exactly."""
    layers = []
    for c in scales:
        lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(8) * c)
        layers.append(lin)
    return nn.Sequential(*layers)


def test_bn207_explosion_at_the_second_layer_fires_without_a_trend():
    # second moments m, 1e4 m, m, m: the peak is at layer 1, two points give no trend (NaN), the ratio decides
    (f,) = rule_findings("BN207", _scaled_chain([1.0, 100.0, 0.01, 1.0]), features(64, 8))
    ev = f.evidence
    assert f.layer == "1" and ev["first_layer"] == "0" and ev["worst_layer"] == "1"
    assert ev["ratio"] == pytest.approx(1e4, rel=1e-4) and math.isnan(ev["per_layer_factor"])
    assert "second moment grows" in f.message and "explodes" in f.message


def test_bn207_vanishing_message_says_falls():
    (f,) = rule_findings("BN207", _scaled_chain([1.0, 0.1, 0.1, 0.1, 1.0]), features(64, 8))
    assert f.layer == "3" and f.evidence["ratio"] == pytest.approx(1e-6, rel=1e-4)
    assert "second moment falls" in f.message and "vanishes" in f.message
    assert f.evidence["per_layer_factor"] == pytest.approx(0.01, rel=1e-3)


def test_bn207_leaves_a_non_finite_last_layer_to_bn209():
    model = _scaled_chain([1.0, 0.1, 0.1, 0.1, 1.0])
    with torch.no_grad():
        model[4].weight.fill_(float("nan"))
    assert not rule_findings("BN207", model, features(64, 8))
    assert rule_findings("BN207", _scaled_chain([1.0, 0.1, 0.1, 0.1, 1.0]), features(64, 8))  # finite: it fires


# --- BN208 / the data probe -------------------------------------------------------------------------------------
class _ScalarRelu(nn.Module):
    """A ReLU over a 1-D output: one unit per sample."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x[:, 0] + self.shift)


def test_probe_counts_a_one_dimensional_relu_output_as_one_unit():
    x = features(16)
    assert run_data_probe(_ScalarRelu(-100.0), [Batch(x)]).dead == {"act": (1, 1)}
    assert run_data_probe(_ScalarRelu(100.0), [Batch(x)]).dead == {"act": (0, 1)}
    (f,) = rule_findings("BN208", _ScalarRelu(-100.0), x)
    assert f.layer == "act" and f.evidence["dead_units"] == 1 and f.evidence["units"] == 1


class _ScalarInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(1, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x[:, None]))


def test_probe_input_layout_by_rank():
    assert run_data_probe(nn.Sequential(nn.BatchNorm1d(4)), [Batch(features(8))]).input["layout"] == "features"
    images = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    probe = run_data_probe(nn.Sequential(nn.BatchNorm2d(3)), [Batch(images)])
    assert probe.input["layout"] == "channels" and probe.input["mean"].shape == (3,)
    # a 1-D float input has no feature axis: no input moments (BN201 has nothing to judge)
    assert run_data_probe(_ScalarInput(), [Batch(features(8)[:, 0])]).input is None


# --- BN401 small-per-device-batch (planned world size, no process group) ----------------------------------------
class _TwoNorms(nn.Module):
    """bn1 normalizes (N, 8): N values per channel; bn2 normalizes (N, 8, 5): 5N values per channel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.bn2 = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.lin(x))
        return self.bn2(h[:, :, None].expand(-1, -1, 5).contiguous()).mean(2)


def test_bn401_reads_each_layers_own_samples_and_values():
    found = {f.layer: f.evidence for f in rule_findings("BN401", _TwoNorms(), features(32, 8), {"world_size": 4})}
    assert set(found) == {"bn1", "bn2"}
    assert (found["bn1"]["samples_per_device"], found["bn1"]["values_per_channel_per_device"]) == (8, 8)
    assert (found["bn2"]["samples_per_device"], found["bn2"]["values_per_channel_per_device"]) == (8, 40)


def test_bn401_is_an_error_at_one_value_per_channel_a_warning_at_two():
    (two,) = [f for f in rule_findings("BN401", _TwoNorms(), features(8, 8), {"world_size": 4}) if f.layer == "bn1"]
    assert two.evidence["values_per_channel_per_device"] == 2 and two.severity == "warning"
    (one,) = [f for f in rule_findings("BN401", _TwoNorms(), features(4, 8), {"world_size": 4}) if f.layer == "bn1"]
    assert one.evidence["values_per_channel_per_device"] == 1 and one.severity == "error"


# --- probes of the BN30x rules ----------------------------------------------------------------------------------
def _bn_net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(dropout), nn.BatchNorm1d(4)).train()


def _no_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)  # a predict() that forgets model.eval()


def test_predict_mutations_delta_is_the_float_buffers_change():
    model = _bn_net()
    batches = [features(16, seed=1, scale=0.1), features(16, seed=2, scale=0.1)]
    res = predict_mutations(model, batches, _no_eval)
    naive = copy.deepcopy(model)
    before = {k: v.clone() for k, v in naive.state_dict().items() if "running" in k}
    with torch.no_grad():
        for b in batches:
            naive(b)
    expected = max(float((naive.state_dict()[k].double() - v.double()).abs().max()) for k, v in before.items())
    (change,) = res.changes
    assert change.layer == "2" and change.buffers == ("num_batches_tracked", "running_mean", "running_var")
    assert change.max_abs_delta == pytest.approx(expected, rel=1e-12) and expected < 1  # the counter's +2 not in it
    assert change.num_batches_tracked == (0, 2)


def test_predict_mutations_reports_no_counter_when_only_a_float_buffer_moved():
    def nudge(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            model[2].running_mean.add_(0.5)
        return model(x)

    (change,) = predict_mutations(_bn_net(), [features(8)], nudge).changes
    assert change.buffers == ("running_mean",) and change.max_abs_delta == pytest.approx(0.5)
    assert change.num_batches_tracked is None


def test_predict_mutations_seeds_zero_by_default():
    model = _bn_net(dropout=0.5)  # dropout before BatchNorm: the running statistics depend on the masks
    batches = [features(16, seed=1)]
    delta = {s: predict_mutations(model, batches, _no_eval, seed=s).changes[0].max_abs_delta for s in (0, 1)}
    assert delta[0] != delta[1]
    assert predict_mutations(model, batches, _no_eval).changes[0].max_abs_delta == delta[0]


def test_concat_passes_a_tensor_without_the_batch_dimension_through():
    mask = torch.arange(5.0)
    a, b = (features(2, seed=1), mask), (features(3, seed=2), mask)
    x, m = concat([a, b])
    assert torch.equal(x, torch.cat([a[0], b[0]])) and torch.equal(m, mask)


def test_cobatch_pools_batches_and_splits_three_samples_into_two_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    x = features(4)
    # two batches of 2 are pooled into 4 samples: a reference pair, a disjoint pair and the sample alone
    assert cobatch_invariance(model, [x[:2], x[2:]]).compared == (2, 2, 1)
    pair = cobatch_invariance(model, [x[:2]])  # no disjoint co-batch: only the sample alone is compared
    assert pair.compared == (2, 1) and pair.max_abs_delta < 1e-6
    # three samples: sample 0 with 1, then with 2
    assert cobatch_invariance(model, [x[:3]]).compared == (2, 2, 1)


def test_channel_moments_take_a_batch_of_two():
    x = features(2).double()
    mom = ChannelMoments()
    mom.add(x)
    assert mom.calls == 1 and mom.samples == 2
    torch.testing.assert_close(mom.mean, x.mean(0))
    torch.testing.assert_close(mom.var, x.var(0, unbiased=True))
    one = ChannelMoments()
    one.add(x[:1])
    assert one.calls == 0 and one.mean is None


def test_layer_fit_against_a_reference_of_another_width_reports_no_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    reference = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    layer = running_stats_fit(model, [features(8)], reference=reference).layers["1"]
    assert layer.z is None and layer.r is None and layer.channels == 5
    same = running_stats_fit(model, [features(8)]).layers["1"]
    assert same.z is not None and same.r is not None


def _bn_then_linear(weight_scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.mul_(weight_scale)
        model[1].bias.mul_(weight_scale)
    return model


def test_train_eval_gap_uses_batches_of_two():
    res = train_eval_gap(_bn_then_linear(1.0), [features(2, seed=1), features(2, seed=2)])
    assert res.note == "" and res.batches == 2 and res.samples == 4


def test_train_eval_gap_output_change_against_a_naive_recomputation():
    model = _bn_then_linear(0.1)
    x = features(16, seed=3, scale=3.0)
    res = train_eval_gap(model, [x])
    with torch.no_grad():
        e = copy.deepcopy(model).eval()(x).double()
        t = copy.deepcopy(model).train()(x).double()
    eval_rms = float(e.pow(2).mean().sqrt())
    assert 0 < eval_rms < 1  # the case the relative change must divide by
    assert res.metric == "output" and res.eval_value == pytest.approx(eval_rms, rel=1e-9)
    assert res.relative_change == pytest.approx(float((t - e).pow(2).mean().sqrt()) / eval_rms, rel=1e-9)


def test_train_eval_gap_of_an_all_zero_output_is_zero():
    res = train_eval_gap(_bn_then_linear(0.0), [features(8)])
    assert res.metric == "output" and res.eval_value == 0.0 and res.relative_change == 0.0


def test_train_eval_gap_float_targets_of_the_output_size_are_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 1))
    x, y = features(16, seed=4), torch.linspace(0.0, 0.9, 16)  # float targets that also look like class indices of 1
    res = train_eval_gap(model, [Batch(x, y)])
    with torch.no_grad():
        e = copy.deepcopy(model).eval()(x).double()[:, 0]
    assert res.metric == "mse" and res.eval_value == pytest.approx(float((e - y.double()).pow(2).mean()), rel=1e-9)


class _Votes(nn.Module):
    """Integer class votes (N, 3): an output cross-entropy cannot be computed on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.body(x) > 0).long()


def test_train_eval_gap_compares_integer_outputs_as_outputs_even_with_class_targets():
    x, y = features(16, seed=5), torch.arange(16) % 3
    assert train_eval_gap(_Votes(), [Batch(x, y)]).metric == "output"


def test_eval_mode_steps_counts_a_counter_stuck_at_zero():
    # frozen in eval mode from the start: the counter never leaves 0, and every step after the first is confirmed
    (span,) = eval_mode_steps([0, 1, 2], {"bn": [False] * 3}, {"bn": [True] * 3}, {"bn": [0, 0, 0]})
    assert span.steps == (1, 2) and span.stalled_at == 0 and span.confirmed
    assert not eval_mode_steps([0, 1, 2], {"bn": [False] * 3}, {"bn": [True] * 3}, {"bn": [-1, -1, -1]})


# --- BN30x rules (slower: trained digits models) ------------------------------------------------------------
def test_names_lists_exactly_the_limit_without_a_remainder():
    assert name_list(list("abcdef")) == "a, b, c, d, e, f"
    assert name_list(list("abcdefg")) == "a, b, c, d, e, f and 1 more"


def test_model_with_moved_running_var_alone_counts_as_trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert not _model_trained(model)
    with torch.no_grad():
        model[1].running_var.fill_(2.0)  # running_mean still 0, no batch counted, gamma and beta constant
    assert _model_trained(model)


def _stale_r(options=None) -> float:
    found = [f for f in rule_findings("BN302", XM.trained_mlp(), XM.shifted_digits(), options) if f.layer == "1"]
    return found[0].evidence["r"] if found else float("nan")


def test_bn302_variance_ratio_range_is_inclusive_at_both_ends():
    r = _stale_r({"z_max": 1e9, "r_min": 1e-9, "r_max": 1e-9})  # every r is above r_max: read it
    assert r > 0
    at_edges = {"z_max": 1e9, "r_min": r, "r_max": r}
    assert not [f for f in rule_findings("BN302", XM.trained_mlp(), XM.shifted_digits(), at_edges) if f.layer == "1"]
    above = {"z_max": 1e9, "r_min": math.nextafter(r, math.inf), "r_max": 1e9}
    assert [f for f in rule_findings("BN302", XM.trained_mlp(), XM.shifted_digits(), above) if f.layer == "1"]
    below = {"z_max": 1e9, "r_min": 1e-9, "r_max": math.nextafter(r, -math.inf)}
    assert [f for f in rule_findings("BN302", XM.trained_mlp(), XM.shifted_digits(), below) if f.layer == "1"]


def test_bn303_evidence_states_the_initial_buffers():
    (f,) = [f for f in rule_findings("BN303", XM.ema_params_only(), X.digits()) if f.layer == "1"]
    assert f.evidence["running_mean"] == 0.0 and f.evidence["running_var"] == 1.0
    bn = XM.ema_params_only()[1]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)  # what the evidence claims


def test_bn301_evidence_has_no_dropout_entry_when_none_was_active():
    (f,) = [f for f in rule_findings("BN301", XM.untracked_mlp(), X.digits()) if f.layer == "1"]
    assert "active_dropout" not in f.evidence


def test_bn304_with_float_targets_compares_mse_and_has_no_accuracy():
    x, y = X.digits()
    onehot = nn.functional.one_hot(y, 10).float()
    # the rule reads a gap that has no accuracy (None) and still decides on the loss alone
    res = train_eval_gap(XM.ema_params_only(), [Batch(x, onehot)])
    assert res.metric == "mse" and res.train_accuracy is None and res.eval_accuracy is None
    report = bnaudit.inspect(XM.ema_params_only(), (x, onehot), select=["BN304"])
    assert "BN304" in report.rules_run and "BN304" not in report.rules_skipped, report.rules_skipped
    ratio = res.eval_value / res.train_value
    assert bool(report.findings) == (ratio > 1.5 and res.eval_value - res.train_value > 0.1)


def test_bn306_evidence_rounds_each_delta_to_six_decimals():
    (f,) = rule_findings("BN306", XM.trained_mlp(), X.digits(), predict=XM.predict_no_eval)
    deltas = [c["max_abs_delta"] for c in f.evidence["changed"].values()]
    assert deltas and all(d > 0 and d == round(d, 6) for d in deltas)
    assert any(d != round(d, 5) for d in deltas)  # six decimals, not fewer
    # the message quotes the first changed BatchNorm's counter
    name, first = next((k, c) for k, c in f.evidence["changed"].items() if "num_batches_tracked" in c)
    before, after = first["num_batches_tracked"]
    assert f"{name}.num_batches_tracked went {before} -> {after}" in f.message


class _SpareNorm(nn.Module):
    """A BatchNorm registered but never called, next to one that runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.spare = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def test_running_stats_fit_covers_only_the_layers_that_ran():
    assert set(running_stats_fit(_SpareNorm(), [features(8)]).layers) == {"bn"}
    # a reference with a BatchNorm the pass never saw: nothing to compare it with
    reference = _SpareNorm()
    reference.extra = nn.BatchNorm1d(3)
    assert set(running_stats_fit(_SpareNorm(), [features(8)], reference=reference).layers) == {"bn"}


def test_cobatch_of_an_all_zero_output_changes_by_zero():
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    res = cobatch_invariance(model.eval(), [features(4)])
    assert res.scale == 0.0 and res.max_abs_delta == 0.0 and res.relative == 0.0


def test_bn401_skips_a_batchnorm_the_example_never_reaches():
    found = rule_findings("BN401", _SpareNorm(), features(32), {"world_size": 4})
    assert [f.layer for f in found] == ["bn"] and found[0].evidence["samples_per_device"] == 8


def test_bn302_names_only_the_threshold_crossed():
    options = {"z_max": 0.0, "r_min": 1e-9, "r_max": 1e9}  # any shift crosses, no variance ratio can
    (f,) = [f for f in rule_findings("BN302", XM.trained_mlp(), XM.shifted_digits(), options) if f.layer == "1"]
    assert "mean shift z=" in f.message and "variance ratio r=" not in f.message


class _SharedNorm(nn.Module):
    """Two BatchNorms; the first is called twice per forward, so the two count different batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn = nn.Linear(64, 16), nn.BatchNorm1d(16)
        self.lin2, self.bn2, self.head = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.relu(self.bn(self.lin(x))))
        return self.head(self.bn2(self.lin2(h)))


def test_bn306_quotes_the_counter_of_the_first_changed_batchnorm_when_counts_differ():
    (f,) = rule_findings("BN306", _SharedNorm(), X.digits(), predict=XM.predict_no_eval)
    bn, bn2 = (f.evidence["changed"][k]["num_batches_tracked"] for k in ("bn", "bn2"))
    calls = f.evidence["calls"]
    assert calls >= 1 and bn == [0, 2 * calls] and bn2 == [0, calls]
    assert f"bn.num_batches_tracked went 0 -> {2 * calls}" in f.message


def test_recalibrate_command_quotes_a_spec_only_when_it_can_be_typed_again():
    def command(name):
        (f,) = rule_findings("BN306", XM.trained_mlp(), X.digits(), predict=XM.predict_no_eval, name=name)
        return f.fix.split("`")[1]

    assert command("models/net.pt") == "bnaudit recalibrate models/net.pt --data DATA -o recalibrated.pt"
    # a name with a space is not a spec the shell takes back as one word: a placeholder instead
    assert command("my models/net.pt") == "bnaudit recalibrate MODEL --data DATA -o recalibrated.pt"


def test_cobatch_pools_only_the_first_batch_when_the_next_cannot_be_concatenated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    x = features(3)
    # the second batch has another width: no pool of both, the first batch alone is probed
    alone = cobatch_invariance(model, [x])
    mixed = cobatch_invariance(model, [x, features(5, f=6, seed=1)])
    assert mixed.compared == alone.compared == (2, 2, 1)
    assert mixed.max_abs_delta == alone.max_abs_delta


def test_t_quantile_against_the_exact_student_t_quantile():
    from scipy.stats import t

    from bnaudit.rules.data import _t_quantile

    # the docstring's claim: within 0.3% at p = 0.95 for two or more degrees of freedom
    for dof in range(2, 101):
        assert _t_quantile(0.95, dof) == pytest.approx(t.ppf(0.95, dof), rel=3e-3)
    # a fourth-order expansion in 1/dof: its error falls like dof**-5 (6e-8 at 20, 2e-11 at 100)
    for dof in (20, 30, 50, 100):
        assert abs(_t_quantile(0.95, dof) - t.ppf(0.95, dof)) < 1e-6 * (20 / dof) ** 4


def test_bn203_measures_from_two_batches_when_min_batches_allows_it():
    from bnaudit.rules import examples_data as XD

    def found(options):
        model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
        return rule_findings("BN203", model, XD.mean_noise_batches(0.95, batches=2), options, steps=2)

    assert found(None) == []  # the default needs three batches
    (f,) = found({"min_batches": 2})  # two is the least that makes a bound, and is accepted
    assert f.layer == "0" and f.evidence["batches"] == 2


def test_bn207_growth_exactly_at_max_ratio_is_not_reported():
    # scales that are powers of two scale every moment exactly: second moments m, 4m, 16m, 64m
    model = _scaled_chain([1.0, 2.0, 2.0, 2.0])
    (f,) = rule_findings("BN207", model, features(64, 8), {"max_ratio": 63.0})
    assert f.layer == "3" and f.evidence["ratio"] == 64.0 and f.evidence["per_layer_factor"] == pytest.approx(4.0)
    assert rule_findings("BN207", model, features(64, 8), {"max_ratio": 64.0}) == []  # the limit itself is allowed


def test_cobatch_counts_only_dropout_that_drops_something():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    res = cobatch_invariance(model.train(), [features(6)], XM.predict_no_eval)  # a predict() without model.eval()
    assert res.active_dropout == ("3",)  # "1" is in train mode too, but with p = 0 it is the identity


def test_model_with_untracked_batchnorm_and_constant_affine_is_not_trained():
    # track_running_stats=False: no running buffers to read, and a fresh gamma/beta shows no training
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert _model_trained(model) is False
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(4.0))
        model[1].bias.copy_(torch.arange(4.0))
    assert _model_trained(model) is True  # gamma and beta that vary per channel: trained


def test_bn401_is_silent_exactly_at_min_batch_and_min_values():
    # batches of 64 on 4 devices: 16 per device, bn1 with 16 values per channel: both at the default limits
    assert rule_findings("BN401", _TwoNorms(), features(64, 8), {"world_size": 4}, batch_size=64) == []
    found = {f.layer: f.evidence for f in rule_findings("BN401", _TwoNorms(), features(60, 8), {"world_size": 4}, batch_size=60)}
    assert found["bn1"]["samples_per_device"] == 15 and found["bn1"]["values_per_channel_per_device"] == 15


def test_predict_train_mode_layers_names_only_batchnorms_that_track_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.Linear(4, 2))
    # "3" uses batch statistics in either mode: that is BN301's finding, not a predict() that skips eval()
    assert predict_train_mode_layers(model, features(4), XM.predict_no_eval) == ("1",)
    assert predict_train_mode_layers(model, features(4), XM.predict_eval) == ()


def test_bn207_vanishing_needs_the_ratio_below_one_over_max_ratio_and_a_falling_trend():
    # second moments m, m/4, m/16, m/64 (exact: powers of two): a ratio of 1/64
    falling = _scaled_chain([1.0, 0.5, 0.5, 0.5])
    assert rule_findings("BN207", falling, features(64, 8), {"max_ratio": 100.0}) == []  # 1/64 is not below 1/100
    (f,) = rule_findings("BN207", falling, features(64, 8), {"max_ratio": 63.0})
    assert f.layer == "3" and "vanishes" in f.message
    # log2 second moments 0, 0, 26, -8: the last layer is 256x below the first, but the fitted trend over the
    # four layers rises (x2**0.2 per layer): not vanishing; the peak at layer 2 explodes instead
    (f,) = rule_findings("BN207", _scaled_chain([1.0, 1.0, 2.0**13, 2.0**-17]), features(64, 8), {"max_ratio": 100.0})
    assert f.layer == "2" and "explodes" in f.message
