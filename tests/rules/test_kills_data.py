"""Edge cases of the BN2xx rules (rules/data.py) and the data probe (probes/data.py) that the mutation check
(`tools/mutation.py`, `docs/mutation.md`) found unpinned: each test decides a behaviour that a plausible one-token
change would alter (a threshold at its edge, an evidence value against a naive recomputation, an edge path). Real
small models, real or exactly constructed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnaudit.context import RuleContext
from bnaudit.loading.data import Batch
from bnaudit.probes.data import SATURATION, run_data_probe
from bnaudit.recording import record
from bnaudit.rules import examples_data as XD
from bnaudit.rules.data import ActivationDrift
from tests.rules.kills import rule_findings, rule_report, seeded_randn


def _below(v: float) -> float:
    return math.nextafter(v, -math.inf)


# --- BN201 unnormalized-input -----------------------------------------------------------------------------------
def _scaled_features(stds, means=None, n: int = 64) -> torch.Tensor:
    """(n, f) inputs whose feature j is exactly ``means[j] + stds[j] * (+-1)`` in equal halves."""
    sign = torch.tensor([1.0, -1.0]).repeat(n // 2)[:, None]
    x = sign * torch.tensor(stds, dtype=torch.float32)[None, :]
    return x + (torch.tensor(means, dtype=torch.float32)[None, :] if means is not None else 0.0)


def test_bn201_scale_ratio_at_the_threshold_is_not_reported_just_below_it_is():
    (f,) = rule_findings("BN201", XD.mlp(2), XD.age_income())
    ratio = f.evidence["scale_ratio"]
    quiet = {"max_mean_to_std": 1e9}
    assert not rule_findings("BN201", XD.mlp(2), XD.age_income(), {"max_scale_ratio": ratio, **quiet})
    (g,) = rule_findings("BN201", XD.mlp(2), XD.age_income(), {"max_scale_ratio": _below(ratio), **quiet})
    assert g.evidence["scale_ratio"] == ratio and "off_centre_features" not in g.evidence


def test_bn201_mean_to_std_at_the_threshold_is_not_reported_just_below_it_is():
    (f,) = rule_findings("BN201", XD.mlp(2), XD.age_income())
    worst = f.evidence["worst_mean_to_std"]
    quiet = {"max_scale_ratio": 1e9}
    assert not rule_findings("BN201", XD.mlp(2), XD.age_income(), {"max_mean_to_std": worst, **quiet})
    (g,) = rule_findings("BN201", XD.mlp(2), XD.age_income(), {"max_mean_to_std": _below(worst), **quiet})
    assert g.evidence["worst_mean_to_std"] == worst and g.evidence["off_centre_features"] == [0]
    assert "scale_ratio" not in g.evidence and "sit far from zero" in g.message


def test_bn201_default_thresholds():
    # scales 150x apart (between the default 100 and 200), means at 0: the scale part alone
    (f,) = rule_findings("BN201", XD.mlp(2), _scaled_features([1.0, 150.0]))
    assert f.evidence["scale_ratio"] == pytest.approx(150.0, rel=1e-6)
    assert (f.evidence["largest_std_feature"], f.evidence["smallest_std_feature"]) == (1, 0)
    assert f.evidence["max_scale_ratio"] == 100.0 and "off_centre_features" not in f.evidence
    assert "feature scales differ" in f.message
    # a mean 4 stds from zero (between the default 3 and 6): the off-centre part alone
    (g,) = rule_findings("BN201", XD.mlp(2), _scaled_features([1.0, 1.0], [0.0, 4.0]))
    assert g.evidence["off_centre_features"] == [1] and g.evidence["worst_mean_to_std"] == pytest.approx(4.0)
    assert g.evidence["max_mean_to_std"] == 3.0 and "scale_ratio" not in g.evidence
    assert not rule_findings("BN201", XD.mlp(2), _scaled_features([1.0, 90.0], [0.0, 2.9]))


def test_bn201_judges_a_single_live_feature_and_ignores_constant_ones():
    # feature 0 constant (std 0): not live, neither a scale nor an off-centre feature even at a tight threshold
    x = _scaled_features([0.0, 1.0], [5.0, 10.0])
    (f,) = rule_findings("BN201", XD.mlp(2), x, {"max_mean_to_std": 0.5})
    assert f.evidence["off_centre_features"] == [1] and "scale_ratio" not in f.evidence
    # one feature only, far from zero
    (g,) = rule_findings("BN201", XD.mlp(1), _scaled_features([1.0], [10.0]))
    assert g.evidence["off_centre_features"] == [0] and g.evidence["features"] == 1


def test_bn201_a_tiny_but_nonzero_std_is_live():
    # std 1.5e-12 is above the 1e-12 floor: a live feature, 6.7e11 times smaller than the other
    (f,) = rule_findings("BN201", XD.mlp(2), _scaled_features([1.5e-12, 1.0]), {"max_mean_to_std": 1e9})
    assert f.evidence["smallest_std_feature"] == 0 and f.evidence["scale_ratio"] > 1e11


def test_bn201_lists_at_most_twenty_off_centre_features():
    (f,) = rule_findings("BN201", XD.mlp(25), _scaled_features([1.0] * 25, [10.0] * 25))
    assert f.evidence["off_centre_features"] == list(range(20)) and "25 feature(s) sit far" in f.message


def test_bn201_says_channel_for_images():
    x = _scaled_features([1.0, 150.0, 1.0])[:, :, None, None].expand(64, 3, 2, 2).contiguous()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    (f,) = rule_findings("BN201", model, x)
    assert "channel scales differ" in f.message and f.evidence["layout"] == "channels"


class _ParameterOnly(nn.Module):
    """No submodule: the input reaches the output through a functional op alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class _TwoBranches(nn.Module):
    """The input feeds a BatchNorm and, beside it, a Linear layer: it is not normalized on every path."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.lin = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x)) + self.lin(x)


def test_bn201_is_skipped_only_when_every_first_layer_is_a_norm():
    assert rule_findings("BN201", _ParameterOnly(), XD.age_income())  # no first module: nothing normalizes
    assert rule_findings("BN201", _TwoBranches(), XD.age_income())


# --- BN202 too-few-values-per-channel ---------------------------------------------------------------------------
def _batches(size: int, count: int = 3, f: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(seeded_randn(size, f, seed=i), torch.arange(size) % 2) for i in range(count)]


@pytest.mark.parametrize(("size", "severity"), [(2, "warning"), (7, "warning"), (8, None)])
def test_bn202_error_below_two_values_warning_below_min_values(size, severity):
    found = rule_findings("BN202", XD.mlp_bn(), _batches(size))
    assert [f.severity for f in found] == ([severity] if severity else [])
    if found:
        assert found[0].evidence["values_per_channel"] == size and found[0].evidence["min_values"] == 8
        assert f"a batch of {size} sample(s)" in found[0].message


def test_bn202_names_the_last_batch_only_when_it_is_the_short_one():
    loader = DataLoader(TensorDataset(seeded_randn(24, 4), torch.arange(24) % 2), batch_size=4)
    (f,) = rule_findings("BN202", XD.mlp_bn(), loader)  # every batch is 4: not "the last batch"
    assert f.message.startswith("a batch of 4 sample(s)") and f.evidence["batch_size"] == 4
    (g,) = rule_findings("BN202", XD.mlp_bn(), XD.odd_dataset())
    assert g.message.startswith("the last batch of 1 sample(s)")


def test_bn202_counts_the_loaders_short_last_batch_even_when_the_probe_never_ran_it():
    (f,) = rule_findings("BN202", XD.mlp_bn(), XD.odd_dataset(), steps=1)  # the probe sees one batch of 32
    assert f.severity == "error" and f.evidence["values_per_channel"] == 1 and f.evidence["batch"] == 1
    assert "error" not in f.evidence  # no batch failed in the probe
    (g,) = rule_findings("BN202", XD.mlp_bn(), XD.odd_dataset())  # the probe ran the batch of one: its error is quoted
    assert "Expected more than 1 value per channel" in g.evidence["error"]


# --- BN203 batch-stat-noise -------------------------------------------------------------------------------------
def _bn_first(f: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(f), nn.Linear(f, 2))


def test_bn203_lower_bound_at_the_threshold_is_not_reported_just_below_it_is():
    data = XD.mean_noise_batches(0.6)
    (f,) = rule_findings("BN203", _bn_first(), data)
    lower = f.evidence["mean_noise_lower"]
    assert not rule_findings("BN203", _bn_first(), data, {"max_mean_noise": lower})
    (g,) = rule_findings("BN203", _bn_first(), data, {"max_mean_noise": _below(lower)})
    assert g.evidence["mean_noise_lower"] == lower and g.evidence["max_mean_noise"] == _below(lower)


def test_bn203_measures_three_batches_by_default():
    (f,) = rule_findings("BN203", _bn_first(), XD.mean_noise_batches(0.9, batches=3))
    assert f.evidence["batches"] == 3 and f.evidence["mean_noise_median"] == pytest.approx(0.9, abs=1e-5)
    assert not rule_findings("BN203", _bn_first(), XD.mean_noise_batches(0.9, batches=2))


def test_bn203_evidence_against_a_naive_recomputation():
    data = XD.tiny_batches()
    (f,) = rule_findings("BN203", _bn_first(), data)
    x = np.stack([b[0].double().numpy() for b in data])  # (batches, samples, channels)
    cm, cv = x.mean(axis=1), x.var(axis=1)
    pop_var = cv.mean(axis=0) + cm.var(axis=0)
    noise = cm.std(axis=0) / np.sqrt(pop_var)
    ev = f.evidence
    assert ev["mean_noise_median"] == pytest.approx(float(np.median(noise)), rel=1e-4)
    assert ev["mean_noise_max"] == pytest.approx(float(noise.max()), rel=1e-4)
    assert ev["var_ratio_spread_median"] == pytest.approx(float(np.median((cv / pop_var).std(axis=0))), rel=1e-4)
    assert ev["population_mean_abs_max"] == pytest.approx(float(np.abs(cm.mean(axis=0)).max()), rel=1e-4)
    assert ev["values_per_channel"] == 4 and ev["batches"] == 8


def test_bn203_a_channel_of_tiny_variance_still_counts():
    # channel 0 spreads its batch means by 0.9 population stds, at a population variance of about 1.4e-12
    data = []
    for (x, y), (z, _) in zip(XD.mean_noise_batches(0.9), XD.mean_noise_batches(0.1), strict=True):
        data.append((torch.cat([x[:, :1] * 1.2e-6, z[:, 1:]], dim=1), y))
    (f,) = rule_findings("BN203", _bn_first(), data, {"max_mean_noise": 0.01})
    assert f.evidence["mean_noise_max"] == pytest.approx(0.9, rel=1e-3)


# --- BN204 non-iid-batches / the label order -------------------------------------------------------------------
def _labelled(labels) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch per entry of ``labels`` (a list of label lists), inputs random."""
    return [(seeded_randn(len(y), 4, seed=i), torch.tensor(y)) for i, y in enumerate(labels)]


def _loader(labels: list[int], batch_size: int, shuffle: bool = False) -> DataLoader:
    y = torch.tensor(labels)
    return DataLoader(TensorDataset(seeded_randn(len(y), 4), y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0) if shuffle else None)


def _naive_shuffled_purity(batches: list[list[int]]) -> float:
    labels = np.concatenate([np.asarray(b) for b in batches])
    rng = np.random.default_rng(0)
    cuts = np.cumsum([len(b) for b in batches])[:-1]
    return float(np.mean([np.mean([np.bincount(p).max() / len(p) for p in np.split(rng.permutation(labels), cuts)])
                          for _ in range(20)]))


def test_bn204_two_single_class_batches_of_two_classes_fire():
    batches = [[1] * 8, [0] * 8]  # not sorted (1 before 0): the purity test decides
    (f,) = rule_findings("BN204", XD.mlp(), _labelled(batches))
    ev = f.evidence
    assert ev["batch_purity"] == 1.0 and ev["batches"] == 2 and ev["max_purity_excess"] == 0.25
    assert ev["shuffled_purity"] == _naive_shuffled_purity(batches)
    assert ev["excess"] == 1.0 - ev["shuffled_purity"]


def test_bn204_shuffled_purity_against_a_naive_recomputation_over_uneven_batches():
    batches = [[3] * 6 + [0, 1], [1] * 5 + [2], [2] * 7, [0] * 4 + [3] * 4, [3, 2, 1, 0, 0]]
    (f,) = rule_findings("BN204", XD.mlp(), _labelled(batches), {"max_purity_excess": 0.0})
    assert f.evidence["shuffled_purity"] == pytest.approx(_naive_shuffled_purity(batches), abs=1e-12)
    assert f.evidence["batch_purity"] == pytest.approx(np.mean([6 / 8, 5 / 6, 1.0, 0.5, 2 / 5]), abs=1e-12)


def test_bn204_excess_at_the_threshold_is_not_reported_just_below_it_is():
    data = _labelled([[0] * 6 + [1] * 2, [1] * 6 + [2] * 2, [2] * 6 + [0] * 2, [1] * 8])
    (f,) = rule_findings("BN204", XD.mlp(), data, {"max_purity_excess": 0.0})
    excess = f.evidence["excess"]
    assert 0.25 < excess < 0.5  # also fires at the default
    assert rule_findings("BN204", XD.mlp(), data)
    assert not rule_findings("BN204", XD.mlp(), data, {"max_purity_excess": excess})
    assert rule_findings("BN204", XD.mlp(), data, {"max_purity_excess": _below(excess)})


def test_bn204_unshuffled_loader_with_mixed_labels_is_not_called_sorted():
    labels = [i % 3 for i in range(96)]
    assert not rule_findings("BN204", XD.mlp(), _loader(labels, 16))


def test_bn204_sorted_loader_of_two_classes_is_reported_as_sorted():
    (f,) = rule_findings("BN204", XD.mlp(), _loader([0] * 48 + [1] * 48, 16))
    assert f.evidence == {"shuffled": False, "samples_checked": 96, "classes": 2}


def test_bn204_reads_the_label_order_of_at_most_64_batches():
    (f,) = rule_findings("BN204", XD.mlp(), _loader([0] * 100 + [1] * 100, 2))
    assert f.evidence["samples_checked"] == 128 and f.evidence["classes"] == 2


def test_bn204_single_class_data_is_neither_sorted_nor_grouped():
    assert not rule_findings("BN204", XD.mlp(), _loader([1] * 64, 16))  # unshuffled: order known, one class
    assert not rule_findings("BN204", XD.mlp(), _loader([1] * 64, 16, shuffle=True))


def test_bn204_single_class_probe_batches_of_an_unshuffled_two_class_loader_are_grouped():
    labels = [1] * 32 + [0] * 16 + [1] * 16  # not sorted; the probe's first two batches hold class 1 only
    (f,) = rule_findings("BN204", XD.mlp(), _loader(labels, 16), steps=2)
    assert f.evidence == {"classes_seen": 2}
    # one class all along (batches given as a list: their order is read too): nothing is grouped
    assert not rule_findings("BN204", XD.mlp(), _labelled([[1] * 16, [1] * 16]))


def test_bn204_one_probe_batch_or_no_labels_says_nothing():
    assert not rule_findings("BN204", XD.mlp(), _labelled([[1] * 16]))
    float_targets = [(seeded_randn(8, 4, seed=i), seeded_randn(8, seed=10 + i)) for i in range(3)]
    assert not rule_findings("BN204", XD.mlp(), float_targets)


# --- BN205 padding-in-bn-input ----------------------------------------------------------------------------------
class _SeqBN(nn.Module):
    """BatchNorm1d over (N, 3, L) sequences of any length L."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x).mean(2))


def _zero_positions(counts: list[int], length: int, seed: int = 0) -> torch.Tensor:
    x = torch.rand(len(counts), 3, length, generator=torch.Generator().manual_seed(seed)) + 0.5
    for i, k in enumerate(counts):
        x[i, :, :k] = 0.0
    return x


def test_bn205_two_samples_are_enough_for_a_bound():
    (f,) = rule_findings("BN205", _SeqBN(), [_zero_positions([5, 5], 10)])
    ev = f.evidence
    assert ev["samples"] == 2 and ev["zero_positions"] == 0.5 and ev["zero_positions_lower"] == 0.5
    assert ev["zero_values"] == pytest.approx(0.5) and ev["max_zero_positions"] == 0.1


def test_bn205_lower_bound_at_the_threshold_is_not_reported_just_below_it_is():
    data = [_zero_positions([30, 40, 50, 40], 100)]
    (f,) = rule_findings("BN205", _SeqBN(), data)
    lower = f.evidence["zero_positions_lower"]
    assert 0.1 < lower < f.evidence["zero_positions"]
    assert not rule_findings("BN205", _SeqBN(), data, {"max_zero_positions": lower})
    assert rule_findings("BN205", _SeqBN(), data, {"max_zero_positions": _below(lower)})


def test_bn205_pooled_fraction_at_the_threshold_is_not_reported_even_when_the_sample_bound_is_above_it():
    # short sequences (5 positions, 3 zero) and long ones (100 positions, 50 zero): the pooled fraction over
    # positions (0.505) sits below the per-sample bound (about 0.51); the pooled fraction decides first
    y = torch.tensor([0, 1, 0, 1])
    data = [(_zero_positions([3] * 4, 5), y), (_zero_positions([50] * 4, 100, seed=1), y)]
    (f,) = rule_findings("BN205", _SeqBN(), data, {"max_zero_positions": 0.4})
    frac = f.evidence["zero_positions"]
    assert frac == pytest.approx(212 / 420) and f.evidence["zero_positions_lower"] > frac
    assert not rule_findings("BN205", _SeqBN(), data, {"max_zero_positions": frac})


# --- BN206 activation-drift -------------------------------------------------------------------------------------
def _identity_chain(depth: int, width: int = 4) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(width))
            lin.bias.zero_()
        layers.append(lin)
    return nn.Sequential(*layers)


def _drift_run(depth: int = 7, steps: int = 20, c: float = 0.2, inf_from: int | None = None):
    """A chain of identity layers whose first bias moves by ``c`` per step: every layer's mean drifts alike.
    From step ``inf_from`` on, layer 1's bias is +inf (its output is inf, the layers after it NaN)."""
    model = _identity_chain(depth)
    x = seeded_randn(32, 4)
    with record(model) as rec, torch.no_grad():
        for t in range(steps):
            model[0].bias.fill_(t * c)
            if inf_from is not None and t >= inf_from:
                model[1].bias.fill_(math.inf)
            model(x)
            rec.step()
    with torch.no_grad():
        model[0].bias.zero_()
        model[1].bias.zero_()
    return model, rec.history


def _bn206(model: nn.Module, history, outputs: tuple[str, ...] = (), **options) -> list:
    """BN206 run directly, with the output layers given (``inspect`` finds them on the layer graph, ``bnaudit
    watch`` at run time)."""
    ctx = RuleContext(model=model, graph=None, device=torch.device("cpu"), history=history,
                      output_layers=frozenset(outputs))
    return list(ActivationDrift(options=options).check(ctx))


def test_bn206_reports_the_top_five_of_the_layers_over():
    model, h = _drift_run()
    found = rule_findings("BN206", model, history=h)  # the output layer "6" is passed over: 6 layers are over
    assert len(found) == 5 and all(f.evidence["layers_over"] == 6 for f in found)
    assert found[0].evidence["first_window"] == [0, 3] and found[0].evidence["last_window"] == [16, 19]
    assert found[0].evidence["max_shift"] == 1.0
    everything = rule_findings("BN206", model, history=h, options={"top": 10})
    assert sorted(f.layer for f in everything) == ["0", "1", "2", "3", "4", "5"]


def test_bn206_passes_over_the_output_layers():
    model, h = _drift_run()
    found = _bn206(model, h, outputs=("6",), top=10)
    assert sorted(f.layer for f in found) == ["0", "1", "2", "3", "4", "5"]
    assert {f.evidence["layers_over"] for f in found} == {6}


def test_bn206_window_option_sets_the_steps_compared():
    model, h = _drift_run()
    (f, *_) = rule_findings("BN206", model, history=h, options={"window": 2})
    assert f.evidence["first_window"] == [0, 1] and f.evidence["last_window"] == [18, 19]


def test_bn206_shift_at_the_threshold_is_not_reported_just_below_it_is():
    model, h = _drift_run()
    shifts = [f.evidence["shift"] for f in rule_findings("BN206", model, history=h, options={"top": 10})]
    worst = max(shifts)
    assert not rule_findings("BN206", model, history=h, options={"max_shift": worst})
    found = rule_findings("BN206", model, history=h, options={"max_shift": _below(worst)})
    assert found and all(f.evidence["shift"] == worst for f in found)


def test_bn206_skips_layers_whose_shift_is_not_finite():
    model, h = _drift_run(depth=4, c=0.0, inf_from=10)  # layer 1 goes to inf, 2 and 3 to NaN; 0 does not move
    assert not rule_findings("BN206", model, history=h, options={"max_shift": 0.5})


def test_bn206_an_empty_history_says_nothing():
    model = _identity_chain(3)
    with record(model) as rec:
        pass
    assert not rule_findings("BN206", model, history=rec.history)
    assert _bn206(model, None) == []  # no history at all (a context built without one)


# --- BN207 vanishing-or-exploding -------------------------------------------------------------------------------
def _chain(scales: list[float], act: type[nn.Module] | None = None) -> nn.Sequential:
    """Bias-free linear layers with weights ``scale * I`` (8 wide), an optional activation after each."""
    layers: list[nn.Module] = []
    for c in scales:
        lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(8) * c)
        layers += [lin, act()] if act else [lin]
    return nn.Sequential(*layers)


def _positive(n: int = 64, scale: float = 1.0) -> torch.Tensor:
    return scale * (seeded_randn(n, 8).abs() + 0.5)


def test_bn207_counts_weight_layers_only_against_a_naive_second_moment():
    scales = [1.0, 0.1, 0.1, 0.1]
    x = _positive()
    (f,) = rule_findings("BN207", _chain(scales, nn.ReLU), x)  # ReLU of positive values: the identity
    ev = f.evidence
    assert ev["weight_layers"] == 4 and len(ev["second_moments"]) == 4
    naive = [float((x.double() * math.prod(scales[: k + 1])).pow(2).mean()) for k in range(4)]
    assert ev["second_moments"] == pytest.approx(naive, rel=1e-4)
    assert ev["first_second_moment"] == ev["second_moments"][0] and ev["worst_second_moment"] == ev["second_moments"][3]
    assert (ev["first_layer"], ev["worst_layer"], f.layer) == ("0", "6", "6")
    assert "falls 1e+06x" in f.message


def test_bn207_default_max_ratio_and_min_layers():
    a = 6e-4 ** (1 / 6)  # second moments 1, a^2, a^4, a^6: the last is 6e-4 of the first, 4 weight layers
    (f,) = rule_findings("BN207", _chain([1.0, a, a, a]), _positive())
    assert f.evidence["ratio"] == pytest.approx(6e-4, rel=1e-4) and f.evidence["max_ratio"] == 1000.0
    assert not rule_findings("BN207", _chain([1.0, a, a]), _positive())  # 3 weight layers: too few


def test_bn207_a_small_first_second_moment_is_still_a_reference():
    (f,) = rule_findings("BN207", _chain([1.0, 0.1, 0.1, 0.1]), _positive(scale=0.01))
    assert f.evidence["first_second_moment"] < 1e-3 and f.evidence["ratio"] == pytest.approx(1e-6, rel=1e-4)


def test_bn207_a_signal_that_reaches_exactly_zero_vanishes():
    (f,) = rule_findings("BN207", _chain([1.0, 0.1, 0.1, 0.0]), _positive())
    assert f.evidence["ratio"] == 0.0 and f.layer == "3" and "falls 1e+300x" in f.message


def test_bn207_a_zero_first_layer_is_no_reference():
    assert not rule_findings("BN207", _chain([0.0, 1.0, 1.0, 1.0]), _positive())


# --- BN208 dead-or-saturated ------------------------------------------------------------------------------------
def _dead_mlp(dead: int) -> nn.Module:
    torch.manual_seed(0)
    m = XD.mlp(4, 16)
    with torch.no_grad():
        m[0].bias[:dead] = -100.0
        m[0].bias[dead:] = 100.0
    return m


def test_bn208_dead_fraction_default_and_edge():
    (f,) = rule_findings("BN208", _dead_mlp(12), XD.standardized())
    assert (f.evidence["dead_units"], f.evidence["units"], f.evidence["dead_fraction"]) == (12, 16, 0.75)
    assert f.evidence["max_dead"] == 0.5
    assert not rule_findings("BN208", _dead_mlp(8), XD.standardized())  # exactly half is not above half


def test_bn208_relu_without_units_is_not_dead():
    model = nn.Sequential(nn.Linear(4, 0), nn.ReLU(), nn.Linear(0, 2))
    assert run_data_probe(model, [Batch(seeded_randn(8, 4))]).dead == {"1": (0, 0)}
    assert not rule_findings("BN208", model, XD.standardized())


@pytest.mark.parametrize(("kind", "limit"), [(nn.Sigmoid, 5.0), (nn.Tanh, 3.0), (nn.Hardtanh, 1.0), (nn.Hardsigmoid, 3.0)])
def test_bn208_saturation_thresholds_per_activation(kind, limit):
    # the flat tails: slope under 1% of its maximum beyond |x| = 5 (sigmoid), 3 (tanh, hardsigmoid), 1 (hardtanh)
    assert SATURATION[kind] == limit
    # per 8 values: 5 between the limit and twice it, one exactly at the limit, two inside
    row = torch.tensor([1.5, -1.5, 1.9, -1.2, 1.1, 1.0, 0.5, -0.2]) * limit
    x = row.repeat(16, 1)
    probe = run_data_probe(nn.Sequential(kind()), [Batch(x)])
    assert probe.saturated == {"0": (5 / 8, limit)}
    (f,) = rule_findings("BN208", nn.Sequential(kind()), x)
    assert f.evidence == {"saturated_fraction": 5 / 8, "threshold": limit, "max_saturated": 0.5}
    half = torch.tensor([1.5, -1.5, 1.9, -1.2, 1.0, 0.5, -0.2, 0.0]) * limit  # exactly half: not above
    assert not rule_findings("BN208", nn.Sequential(kind()), half.repeat(16, 1))


# --- BN209 non-finite -------------------------------------------------------------------------------------------
class _OwnBuffers(nn.Module):
    """Not a BatchNorm, but with buffers of the same names (NaN, unused by forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("running_mean", torch.full((4,), math.nan))
        self.register_buffer("running_var", torch.full((4,), math.nan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_bn209_reads_running_buffers_of_batchnorms_only():
    model = nn.Sequential(_OwnBuffers(), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    assert not rule_findings("BN209", model, XD.standardized())


def test_bn209_reports_non_finite_inputs_with_their_fraction():
    x, y = XD.standardized(64)
    x[3, 1] = math.nan
    x[5, 2] = math.inf
    found = rule_findings("BN209", XD.mlp(), (x, y))
    (f,) = [f for f in found if f.layer is None]
    assert f.evidence == {"input_nonfinite_fraction": 2 / (64 * 4)}
    assert [g.layer for g in found if g.layer is not None] == ["0"]  # the first layer it reaches


def test_bn209_integer_inputs_have_no_input_finding():
    assert not rule_findings("BN209", XD.PaddedSeq(), XD.padded_tokens())


def test_bn203_bound_at_fifty_percent_from_two_batches_against_the_exact_chi_square():
    from scipy import stats

    data = XD.mean_noise_batches(0.6, batches=2)
    (f,) = rule_findings("BN203", _bn_first(), data, {"min_batches": 2, "confidence": 0.5})
    med = f.evidence["mean_noise_median"]
    # one degree of freedom at the median: Wilson-Hilferty is within 4% of the exact quantile (0.455)
    exact = med * math.sqrt(2 / stats.chi2.ppf(0.5, 1))
    assert f.evidence["mean_noise_lower"] == pytest.approx(exact, rel=0.02)


def test_bn204_a_shuffling_loader_of_rare_classes_is_not_called_grouped():
    # 396 of class 0 and 4 of class 1, shuffled: with this seed the two probe batches hold class 0 only, by
    # chance, not grouping; the order of a shuffling loader is not read, so nothing calls them grouped
    # (reading it would find class 1 and report grouped labels)
    y = torch.tensor([0] * 396 + [1] * 4)
    loader = DataLoader(TensorDataset(seeded_randn(400, 4), y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    report = rule_report("BN204", XD.mlp(), loader, steps=2)
    assert not report.findings



def test_bn201_without_a_layer_graph_still_judges_the_inputs():
    from bnaudit.loading.data import as_source
    from bnaudit.rules.data import UnnormalizedInput

    ctx = RuleContext(model=XD.mlp(2), graph=None, device=torch.device("cpu"), data=as_source(XD.age_income(), "t"))
    (f,) = UnnormalizedInput().check(ctx)
    assert f.evidence["off_centre_features"] == [0] and f.evidence["scale_ratio"] > 1000


def test_bn201_a_std_of_exactly_the_floor_is_not_live():
    # float64 inputs +-a over two samples: the measured std is a to the last bit for a = 1e-12, the floor
    model = nn.Sequential(nn.Linear(2, 2)).double()

    def batch(a: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.tensor([[a, 1.0], [-a, -1.0]], dtype=torch.float64), torch.tensor([0, 1]))]

    assert run_data_probe(model, [Batch(*batch(1e-12)[0])]).input["std"][0] == 1e-12
    assert not rule_findings("BN201", model, batch(1e-12))  # feature 0 is dead: one live feature, nothing to compare
    (f,) = rule_findings("BN201", model, batch(math.nextafter(1e-12, 1.0)))
    assert f.evidence["smallest_std_feature"] == 0 and f.evidence["scale_ratio"] > 1e11


def test_bn202_a_probe_batch_below_the_loaders_short_last_batch_is_not_called_the_last_batch():
    from torch.utils.data import SubsetRandomSampler

    # 70 samples at batch 32 would end in a batch of 6; the sampler serves 4 samples only, one batch of 4
    ds = TensorDataset(seeded_randn(70, 4), torch.arange(70) % 2)
    loader = DataLoader(ds, batch_size=32, sampler=SubsetRandomSampler(range(4), generator=torch.Generator().manual_seed(0)))
    (f,) = rule_findings("BN202", XD.mlp_bn(), loader)
    assert f.evidence["batch"] == 4 and f.message.startswith("a batch of 4 sample(s)")


@pytest.mark.parametrize(("dof", "low", "high"), [(20, -0.22, -0.19), (60, -0.205, -0.19), (100, -0.2, -0.19),
                                                  (200, -0.2, -0.19)])
def test_t_quantile_is_exact_through_the_fourth_order(dof, low, high):
    # A&S 26.7.5 to four terms: the error against the exact quantile is the fifth term, about -0.195 / dof**5
    # (g5 at z = 1.645); a wrong coefficient in any of the four terms leaves an error of order 1 / dof**4
    from scipy import stats

    from bnaudit.rules.data import _t_quantile

    err = _t_quantile(0.95, dof) - stats.t.ppf(0.95, dof)
    assert low < err * dof**5 < high


def _e(v: float) -> float:
    return math.exp(v)


def test_bn207_vanishing_exactly_at_one_over_max_ratio_is_not_reported():
    # power-of-two scales: second moments exactly 1, 1/4, 1/16, 1/64 of the first
    model, x = _chain([1.0, 0.5, 0.5, 0.5]), _positive()
    assert not rule_findings("BN207", model, x, {"max_ratio": 64.0})
    (f,) = rule_findings("BN207", model, x, {"max_ratio": _below(64.0)})
    assert f.evidence["ratio"] == 1 / 64


def test_bn207_explosion_needs_a_rising_trend_above_one():
    # log second moments 0, 5, 5, 0, 0, 7 (relative): the last is e**7 = 1097x the first, the fitted factor 1.53
    (f,) = rule_findings("BN207", _chain([1.0, _e(2.5), 1.0, _e(-2.5), 1.0, _e(3.5)]), _positive())
    assert f.evidence["per_layer_factor"] == pytest.approx(_e(7.5 / 17.5), rel=1e-3) and "explodes" in f.message
    # log second moments 0, 6.9, -6.8, -6.8, -6.8, 6.95: the last is 1043x the first, but the fit falls
    assert not rule_findings("BN207", _chain([1.0, _e(3.45), _e(-6.85), 1.0, 1.0, _e(6.875)]), _positive())


class _SideBranch(nn.Module):
    """A chain whose second weight layer (NaN weights) is a side branch: its output is never used."""

    def __init__(self, first: float, scales: list[float]) -> None:
        super().__init__()
        self.first = _chain([first])
        self.side = _chain([math.nan])
        self.rest = _chain(scales)
        self.bias = nn.Linear(8, 8)
        with torch.no_grad():
            self.bias.weight.copy_(torch.eye(8))
            self.bias.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        self.side(h)
        return self.rest(self.bias(h))


def test_bn207_reference_and_worst_layer_are_the_first_and_last_only():
    # a NaN side branch second in execution order does not stop the check; the chain after it vanishes
    (f,) = rule_findings("BN207", _SideBranch(1.0, [0.01, 0.01, 0.01]), _positive(scale=0.01))
    assert f.evidence["first_layer"] == "first.0" and math.isnan(f.evidence["second_moments"][1])
    # a zero first layer is no reference, even when the layer after it adds a bias
    assert not rule_findings("BN207", _SideBranch(0.0, [0.01, 0.01, 0.01]), _positive())
