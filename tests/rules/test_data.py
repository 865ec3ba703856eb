"""The data rules (BN201-BN209): the numbers behind each finding, the thresholds they cross, and that the
probe leaves the audited model bit-identical. The generic must/must-not cases run in test_examples.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.rules import data as D
from bnaudit.rules import examples_data as DE


def _run(code, model, data=None, **kw):
    report = bnaudit.inspect(model, data, select=[code], **kw)
    assert code not in report.rules_skipped, report.rules_skipped
    return [f for f in report.findings if f.code == code]


def test_bn201_reports_scale_ratio_and_off_centre_features():
    (f,) = _run("BN201", DE.mlp(2), DE.age_income())
    ev = f.evidence
    assert ev["scale_ratio"] > 1000  # 25000 / 12
    assert ev["worst_mean_to_std"] > 3 and ev["off_centre_features"] == [0]  # age: 40 / 12; income: 60k / 25k = 2.4
    assert ev["max_scale_ratio"] == 100.0
    # a looser threshold silences the scale part only
    (g,) = _run("BN201", DE.mlp(2), DE.age_income(), rule_config={"BN201": {"options": {"max_scale_ratio": 1e5}}})
    assert "scale_ratio" not in g.evidence


def test_bn202_last_batch_of_one_is_an_error_small_batches_a_warning():
    (f,) = _run("BN202", DE.mlp_bn(), DE.odd_dataset())
    assert f.severity == "error" and f.layer == "1"
    assert f.evidence["values_per_channel"] == 1 and f.evidence["dataset_len"] == 65 and f.evidence["batch_size"] == 32
    assert "Expected more than 1 value per channel" in f.message
    (g,) = _run("BN202", DE.mlp_bn(), DE.tiny_batches())
    assert g.severity == "warning" and g.evidence["values_per_channel"] == 4
    # NCHW: values per channel count the spatial positions too (8 samples x 4 x 4 = 128)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    assert not _run("BN202", conv, [torch.randn(8, 3, 4, 4) for _ in range(3)])
    # 3 samples of 1 x 2 positions: 6 values per channel, a warning that counts both factors
    (h,) = _run("BN202", conv, [torch.randn(3, 3, 1, 2) for _ in range(3)])
    assert h.severity == "warning" and h.layer == "1"
    assert (h.evidence["values_per_channel"], h.evidence["batch"], h.evidence["values_per_sample"]) == (6, 3, 2)


def test_bn203_noise_close_to_one_over_sqrt_n():
    (f,) = _run("BN203", DE.mlp_bn(), DE.tiny_batches())
    # batch means of 4 iid values fluctuate by about 1/sqrt(4) = 0.5 population stds
    assert 0.3 < f.evidence["mean_noise_median"] < 0.75
    assert f.evidence["values_per_channel"] == 4 and f.evidence["batches"] == 8
    # it fires on the lower confidence bound, which still clears the threshold
    assert 0.3 < f.evidence["mean_noise_lower"] < f.evidence["mean_noise_median"] and f.evidence["confidence"] == 0.95


def _bn_only():
    return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_bn203_within_its_noise_of_the_threshold_is_silent_far_above_fires():
    near = DE.mean_noise_batches(0.33)  # 8 batches: above 0.3, but a std from 8 values is +-27%
    assert not _run("BN203", _bn_only(), near)
    # the bound is what silences it: at 50% confidence the same measurement is reported, at 0.33
    (f,) = _run("BN203", _bn_only(), near, rule_config={"BN203": {"options": {"confidence": 0.5}}})
    assert f.evidence["mean_noise_median"] == pytest.approx(0.33, abs=1e-6)
    (g,) = _run("BN203", _bn_only(), DE.mean_noise_batches(0.6))
    ev = g.evidence
    assert ev["mean_noise_median"] == pytest.approx(0.6, abs=1e-6) and ev["batches"] == 8 and g.layer == "0"
    assert ev["mean_noise_lower"] == pytest.approx(0.6 * D._std_lower_factor(8, 0.95)) and ev["mean_noise_lower"] > 0.3
    assert "95% confidence from 8 batches" in g.message


@pytest.mark.parametrize(("k", "exact"), [(2, 5.9915), (7, 14.0671), (31, 44.9853), (63, 82.5287)])
def test_chi2_quantile_matches_the_table(k, exact):
    assert D._chi2_quantile(0.95, k) == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("batches", [3, 8, 32])
def test_bn203_bound_covers_the_true_noise_95_percent_of_the_time(batches):
    # The oracle: normal batch means with a known spread; the bound must fall below it in 95% of draws.
    rng = np.random.default_rng(0)
    s = rng.normal(0.0, 0.3, size=(40_000, batches)).std(axis=1)
    covered = float(np.mean(s * D._std_lower_factor(batches, 0.95) < 0.3))
    assert covered == pytest.approx(0.95, abs=0.01)


@pytest.mark.parametrize("options", [{"confidence": 1.0}, {"confidence": 0.2}, {"min_batches": 1}])
def test_bn203_rejects_options_that_make_no_bound(options):
    from bnaudit.errors import ConfigError

    with pytest.raises(ConfigError, match="BN203 option"):
        _run("BN203", _bn_only(), DE.mean_noise_batches(0.6), rule_config={"BN203": {"options": options}})


def test_bn204_sorted_and_grouped_labels():
    (f,) = _run("BN204", DE.mlp(), DE.sorted_loader())
    assert f.evidence["shuffled"] is False and f.evidence["classes"] == 10

    # grouped batches from an iterable (no loader to ask): purity against reshuffled labels
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=g), torch.full((16,), i % 4)) for i in range(8)]
    (h,) = _run("BN204", DE.mlp(), batches)
    assert h.evidence["batch_purity"] == 1.0 and h.evidence["shuffled_purity"] < 0.6


def test_bn205_padding_fraction():
    (f,) = _run("BN205", DE.PaddedSeq(), DE.padded_tokens())
    # 2-4 real tokens of 12: about 75% of positions are padding
    assert 0.6 < f.evidence["zero_positions"] < 0.9 and f.layer == "bn"


def test_bn206_reads_the_recorded_history():
    ctx = DE.history(lr=5.0)
    (first, *rest) = _run("BN206", DE.digits_mlp(), **ctx)
    assert first.evidence["shift"] > 1.0 and first.evidence["first_window"][0] == 0
    assert all(f.evidence["shift"] <= first.evidence["shift"] for f in rest)
    report = bnaudit.inspect(DE.digits_mlp(), select=["BN206"])
    assert "BN206" in report.rules_skipped  # no history: skipped, with the reason


def test_bn207_vanishing_and_exploding_evidence():
    (v,) = _run("BN207", DE.deep(nn.Tanh, 0.3), DE.wide_x())
    assert v.evidence["ratio"] < 1e-3 and v.evidence["per_layer_factor"] < 0.5
    (e,) = _run("BN207", DE.deep(nn.Identity, 3.0), DE.wide_x())
    assert e.evidence["ratio"] > 1e3 and e.evidence["per_layer_factor"] > 2


def test_bn208_dead_and_saturated_evidence():
    (d,) = _run("BN208", DE.dead_relu(), DE.standardized())
    assert d.evidence["dead_units"] == 16 and d.evidence["units"] == 16
    (s,) = _run("BN208", DE.saturated_sigmoid(), DE.standardized())
    assert s.evidence["saturated_fraction"] > 0.5 and s.evidence["threshold"] == 5.0


def test_bn209_buffers_and_activations():
    found = _run("BN209", DE.nan_buffer(), DE.standardized())
    assert any(f.layer == "1" and f.evidence.get("buffer") == "running_var" and f.evidence["nonfinite"] == 1 for f in found)
    (act,) = _run("BN209", DE.inf_weight(), DE.standardized())
    assert act.layer == "0" and act.evidence["nonfinite_fraction"] > 0


def test_data_probe_leaves_the_model_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    model.train()
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    report = bnaudit.inspect(model, DE.standardized(), select=["BN2"])
    assert {"BN201", "BN202", "BN203", "BN205", "BN207", "BN208", "BN209"} <= set(report.rules_run)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert flags == [m.training for m in model.modules()]
    assert torch.equal(rng, torch.get_rng_state())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("code", ["BN201", "BN203", "BN205", "BN207", "BN208", "BN209"])
def test_clean_standardized_bn_mlp_raises_nothing(code):
    torch.manual_seed(0)
    assert not _run(code, DE.mlp_bn(), DE.standardized(512))


def test_every_data_rule_documents_its_options():
    from bnaudit.rules import all_rules

    for rule in all_rules():
        if rule.family != "data":
            continue
        doc = rule.doc()
        for option in rule.defaults:
            assert f"{option}:" in doc, (rule.code, option)
        assert "Bad:" in doc and "Good:" in doc


def _bn_input_means(model, batches):
    """The oracle: each BatchNorm's per-channel input mean per batch, from plain pre-hooks, in float64."""
    import copy

    from bnaudit.layers import is_batchnorm

    model = copy.deepcopy(model).eval()
    means: dict[str, list] = {}
    for name, m in model.named_modules():
        if is_batchnorm(m):
            m.train()
            m.register_forward_pre_hook(
                lambda mod, args, name=name: means.setdefault(name, []).append(
                    args[0].double().mean(dim=[d for d in range(args[0].dim()) if d != 1]).numpy()))
    with torch.no_grad():
        for x in batches:
            model(x)
    return {k: np.stack(v) for k, v in means.items()}


def test_data_probe_gives_every_batchnorm_its_own_input_on_a_resnet():
    # A shortcut conv's output has the shape, and after the conv output before it is freed often the address,
    # of the main path's: the probe once recorded one layer's statistics for the other, at random.
    from bnaudit.loading import load_data
    from bnaudit.probes.data import run_data_probe
    from tests.fixtures.architectures import resnet_basic

    model = resnet_basic()
    x = torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = _bn_input_means(model, [b.inputs for b in load_data(x, batch_size=64).batches(limit=8)])
    assert "layers.1.0.downsample.1" in expected
    for _ in range(3):
        probe = run_data_probe(copy.deepcopy(model), load_data(x, batch_size=64).batches(limit=8))
        for name, want in expected.items():
            got = probe.history.series(name, "channel_mean")
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=name)
