"""Edge cases of the BN3xx rules (rules/modes.py, rules/running_stats.py) that the mutation check
(`tools/mutation.py`, `docs/mutation.md`) found unpinned: each test decides a behaviour that a plausible one-token
change would alter (a threshold at its edge, an evidence value against a naive recomputation, an edge path). Real
small models, real or exactly constructed data. Their probes: test_kills_modes_probes.py."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.rules import examples as X
from bnaudit.rules import examples_modes as XM
from tests.rules.kills import features, rule_findings


# --- BN301 batch-dependent-inference ---------------------------------------------------------------------------
def _small_cnn() -> nn.Module:
    """An untrained CNN left in train mode: a batch of one runs (64 values per channel), its co-batches differ."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).train()


def test_bn301_evidence_of_the_default_options():
    (f,) = rule_findings("BN301", _small_cnn(), X.digits(), predict=XM.predict_no_eval)
    ev = f.evidence
    assert ev["tolerance"] == 1e-4 and ev["cobatch_sizes"] == [8, 8, 1] and ev["train_mode_layers"] == ["2"]
    assert "single_sample_error" not in ev and "active_dropout" not in ev  # a batch of one ran, no dropout
    assert ev["numerical_noise"] < 1e-4 / 4 and ev["noise_margin"] == 4.0
    # a co-batch is never smaller than two samples
    (f,) = rule_findings("BN301", _small_cnn(), X.digits(), {"cobatch_size": 1}, predict=XM.predict_no_eval)
    assert f.evidence["cobatch_sizes"] == [2, 2, 1]


class _IntFirst(nn.Module):
    """A model whose first parameter is an integer step counter: the dtype comes from the float ones."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = nn.Parameter(torch.tensor([3]), requires_grad=False)
        self.net = _small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_bn301_tolerance_is_at_least_two_units_in_the_last_place_of_the_models_float_dtype():
    (f,) = rule_findings("BN301", _IntFirst(), X.digits(), predict=XM.predict_no_eval)
    assert f.evidence["tolerance"] == 1e-4
    (f,) = rule_findings("BN301", XM.trained_mlp().to(torch.bfloat16), X.digits(), predict=XM.predict_no_eval)
    assert f.evidence["tolerance"] == 2 * torch.finfo(torch.bfloat16).eps == 0.015625


class _Zeroed(nn.Module):
    """A BatchNorm built with track_running_stats=False whose output is multiplied by 0: it normalizes with
    batch statistics, yet no co-batch changes the output. ``length`` > 1 feeds it (N, C, length), which a
    single sample can normalize; the squeeze() then makes a batch of one fail for reasons of its own."""

    def __init__(self, length: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 10)
        self.bn = nn.BatchNorm1d(64, track_running_stats=False)
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.length == 1 else x[:, :, None].expand(-1, -1, self.length)
        out = self.lin(x) + 0 * self.bn(h).sum()
        return out.squeeze() if self.length > 1 else out


def test_bn301_reports_a_batch_of_one_failing_in_batchnorm_even_when_no_co_batch_changes_the_output():
    (f,) = rule_findings("BN301", _Zeroed(), X.digits())
    assert f.layer == "bn" and f.evidence["relative_delta"] == 0.0 and "numerical_noise" not in f.evidence
    assert "fails on a batch of one sample (ValueError: Expected more than 1 value per channel" in f.message
    # the batch of one fails elsewhere (squeeze), but a layer normalized with batch statistics: still reported
    (f,) = rule_findings("BN301", _Zeroed(length=2), X.digits())
    assert f.layer == "bn" and "fails on a batch of one sample (ValueError: the output has no tensor" in f.message


class _RefusesEight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 8:
            raise RuntimeError("no batches of eight")
        return self.bn(self.lin(x))


def test_bn301_without_predict_does_not_blame_a_predict():
    # the forward itself fails on a co-batch: no predict() was given, so no "predict() raised" DataError
    report = bnaudit.inspect(_RefusesEight().eval(), features(32), select=["BN301"])
    assert "no batches of eight" in report.rules_skipped["BN301"] and "predict" not in report.rules_skipped["BN301"]


def _mixed_modes() -> nn.Module:
    """A tracking BatchNorm left in train mode, and an untracked one in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                          nn.BatchNorm1d(16, track_running_stats=False), nn.Linear(16, 10)).train()
    model[4].eval()
    return model


def test_bn301_one_finding_per_cause():
    found = rule_findings("BN301", _mixed_modes(), X.digits(), predict=XM.predict_no_eval)
    assert [(f.layer, f.evidence.get("train_mode_layers")) for f in found] == [(None, ["1"]), ("4", None)]
    # an untracked layer in train mode is named by the train-mode finding alone
    (f,) = rule_findings("BN301", XM.untracked_mlp(), X.digits(), predict=XM.predict_no_eval)
    assert f.layer is None and f.evidence["train_mode_layers"] == ["1"]
    (f,) = rule_findings("BN301", XM.untracked_mlp(), X.digits())  # eval mode: the untracked layer alone
    assert f.layer == "1" and "train_mode_layers" not in f.evidence


class _Centered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0))


def test_bn301_batch_mixing_without_batchnorm_gets_the_generic_finding_alone():
    (f,) = rule_findings("BN301", _Centered(), X.digits())
    assert f.layer is None and "although no BatchNorm normalized with batch statistics" in f.message


# --- BN306 inference-mutates-stats -----------------------------------------------------------------------------
class _Outlier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] > 50).any()):
            raise RuntimeError("an outlier")
        return self.bn(self.lin(x))


def test_bn306_without_predict_does_not_blame_a_predict():
    from torch.utils.data import DataLoader, TensorDataset

    x = features(32)
    x[20, 0] = 100.0  # in the second batch: the graph pass (first batch) runs, the probe's second call fails
    report = bnaudit.inspect(_Outlier().eval(), DataLoader(TensorDataset(x), batch_size=16), select=["BN306"])
    assert "an outlier" in report.rules_skipped["BN306"] and "predict" not in report.rules_skipped["BN306"]


class _Counting(nn.Module):
    """A BatchNorm MLP with a call counter on the root module and one in a plain submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = XM.trained_mlp()
        self.tally = nn.Module()
        self.tally.register_buffer("seen", torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _predict_counting(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model.calls += 1
        model.tally.seen += x.shape[0]
        return model(x).softmax(1)


def test_bn306_names_batchnorms_and_other_changed_buffers_apart():
    (f,) = rule_findings("BN306", _Counting(), X.digits(), predict=_predict_counting)
    assert set(f.evidence["changed"]) == {"net.1", "net.4", "tally", "<model>"}
    assert f.evidence["changed"]["<model>"]["buffers"] == ["calls"]
    assert "running statistics of 2 BatchNorm layer(s) (net.1, net.4;" in f.message
    assert f.message.endswith("; buffers of <model>, tally changed too")
    assert "net.1.num_batches_tracked went 120 -> 122" in f.message


def test_bn306_buffers_changed_outside_batchnorm_only():
    model = _Counting().eval()
    (f,) = rule_findings("BN306", model, X.digits(), predict=_predict_counting)
    assert "BatchNorm" not in f.message and "changed buffers of <model>, tally: inference" in f.message
    assert "not side-effect free" in f.message and set(f.evidence["changed"]) == {"tally", "<model>"}


def _nudge(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        model[1].running_mean.add_(0.5)
        return model(x)


def test_bn306_batchnorm_changes_alone():
    (f,) = rule_findings("BN306", XM.trained_mlp(), X.digits(), predict=XM.predict_no_eval)
    assert "changed too" not in f.message and set(f.evidence["changed"]) == {"1", "4"}
    # the statistics moved without a counted batch: no counter to quote
    (f,) = rule_findings("BN306", XM.trained_mlp(), X.digits(), predict=_nudge)
    assert set(f.evidence["changed"]) == {"1"} and "num_batches_tracked" not in f.message
    assert "num_batches_tracked" not in f.evidence["changed"]["1"] and "largest change 1" in f.message


# --- BN308 predict-relies-on-eval-mode -------------------------------------------------------------------------
class _Served(nn.Module):
    """Given in eval mode except ``late``; also an InstanceNorm that tracks running statistics and an
    untracked BatchNorm: only ``bn`` is a tracking BatchNorm given in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn = nn.Linear(64, 16), nn.BatchNorm1d(16)
        self.inorm = nn.InstanceNorm1d(16, track_running_stats=True)
        self.untracked, self.late = nn.BatchNorm1d(16, track_running_stats=False), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.lin(x)))
        h = h + self.inorm(h[:, :, None].expand(-1, -1, 2).contiguous()).mean(2) + self.untracked(h)
        return self.head(self.late(h))


def test_bn308_counts_and_names_only_tracking_batchnorms_given_in_eval_mode():
    model = _Served().eval()
    model.late.train()
    (f,) = rule_findings("BN308", model, X.digits(), predict=XM.predict_no_eval)
    assert f.evidence == {"train_mode_layers": ["bn"], "eval_mode_layers_given": 1}


def test_bn308_does_not_call_predict_when_no_batchnorm_is_given_in_eval_mode():
    def broken(model, x):
        raise RuntimeError("only for deployed models")

    # in train mode (as after training): nothing relies on eval mode, predict() is not even called
    assert rule_findings("BN308", XM.trained_mlp(), X.digits(), predict=broken) == []
    with pytest.raises(bnaudit.BnauditError, match="predict\\(\\) raised"):
        bnaudit.inspect(XM.deployed(), X.digits(), predict=broken, select=["BN308"])


# --- BN307 training-in-eval-mode -------------------------------------------------------------------------------
class _Four(nn.Module):
    """bn_a (affine) and bn_b (no affine) feed bn_c; ``spare`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn_a, self.bn_b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.BatchNorm1d(8, affine=False)
        self.bn_c, self.spare, self.head = nn.BatchNorm1d(8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn_c(torch.relu(self.bn_b(self.bn_a(self.lin(x))))))


@functools.lru_cache(maxsize=1)
def _four_recorded() -> tuple[nn.Module, object]:
    """12 recorded steps: the model left in eval mode after step 4 except bn_c, so bn_a and bn_b count 7 steps,
    bn_c 1 (eval after step 10); the never-called ``spare`` in eval mode throughout."""
    model = _Four()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    model.spare.eval()
    with bnaudit.record(model) as rec:
        for step in range(12):
            model(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 4:  # the model in eval mode (BatchNorm held in eval inside a training model is deliberate)
                model.eval()
                model.bn_c.train()
            if step == 10:
                model.bn_c.eval()
            rec.step()
    return model, rec.history


def _bn307(options=None):
    model, history = _four_recorded()
    return rule_findings("BN307", copy.deepcopy(model), None, options, history=history, input_shape="8")


def test_bn307_groups_layers_by_their_steps_in_order_of_the_first_step():
    group, single = _bn307()
    assert group.layer is None and group.evidence["layers"] == ["bn_a", "bn_b"]
    assert (group.evidence["first_step"], group.evidence["eval_steps"], group.evidence["min_steps"]) == (5, 7, 1)
    # one of the two has weights: the message says theirs were trained
    assert group.message.startswith("2 BatchNorm layers (bn_a, bn_b) stayed in eval mode for 7 of 12")
    assert "while their weights were being trained; num_batches_tracked stalled at 5" in group.message
    # a single step counts by default; the never-called spare is BN112's, not reported here
    assert single.layer == "bn_c" and single.evidence["layers"] == ["bn_c"] and single.evidence["eval_steps"] == 1
    assert single.message.startswith("BatchNorm1d bn_c stayed in eval mode for 1 of 12 recorded optimizer steps")
    assert "its weights were being trained; num_batches_tracked stalled at 11" in single.message


def test_bn307_min_steps_at_its_edge():
    assert [f.evidence["layers"] for f in _bn307({"min_steps": 2})] == [["bn_a", "bn_b"]]
    assert [f.evidence["layers"] for f in _bn307({"min_steps": 7})] == [["bn_a", "bn_b"]]
    assert _bn307({"min_steps": 8}) == []
    # fewer than one is one
    assert [(f.evidence["layers"], f.evidence["min_steps"]) for f in _bn307({"min_steps": 0})] == [
        (["bn_a", "bn_b"], 1), (["bn_c"], 1)]


# --- BN302 / BN303 / BN304 on one BatchNorm fed the data directly ----------------------------------------------
def _column(n: int = 64, channels: int = 1) -> torch.Tensor:
    """Distinct values per channel with batch mean 0 and (biased) variance 1 to float precision."""
    v = torch.linspace(-1.5, 1.5, n)[:, None] + 0.01 * torch.randn(n, channels, generator=torch.Generator().manual_seed(0))
    v = v - v.mean(0)
    return v / v.pow(2).mean(0).sqrt()


def _norm(channels: int = 1, mean: float = 0.0, var: float = 1.0, trained: bool = False, head: int = 0) -> nn.Module:
    """A BatchNorm with the given running buffers (and per-channel gamma/beta if ``trained``), optionally
    followed by a Linear head."""
    bn = nn.BatchNorm1d(channels)
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
        if trained:
            bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
            bn.bias.copy_(torch.linspace(-0.5, 0.5, channels))
    return nn.Sequential(bn, nn.Linear(channels, head)) if head else nn.Sequential(bn)


def _rs(code: str, model: nn.Module, data, options=None):
    return rule_findings(code, model, data, options, batch_size=64)


def test_bn302_default_thresholds_and_min_samples():
    x = _column(32, 2)  # exactly min_samples values per channel
    # z ~ 0.35 (between 0.25 and twice that), r ~ 1: the mean shift alone
    (f,) = _rs("BN302", _norm(2, mean=-0.35), x)
    assert 0.34 < f.evidence["z"] < 0.36 and 0.9 < f.evidence["r"] < 1.1 and f.evidence["samples"] == 32
    assert "mean shift z=" in f.message and "variance ratio r=" not in f.message
    assert _rs("BN302", _norm(2, mean=-0.1), x) == []  # z ~ 0.1, r ~ 1 (above r_min 0.7, below twice that)
    # r ~ 2 (between r_max 1.4 and twice that), z ~ 0.14: the variance ratio alone
    (f,) = _rs("BN302", _norm(2, mean=-0.1, var=0.5), x)
    assert 1.9 < f.evidence["r"] < 2.1 and "variance ratio r=" in f.message and "mean shift" not in f.message
    assert _rs("BN302", _norm(2, mean=-0.1, var=0.5), x[:31]) == []  # 31 values per channel: too few to judge


def _edge_value(code: str, key: str, model_fn, x, options) -> float:
    (f,) = _rs(code, model_fn(), x, options)
    return f.evidence[key]


def test_bn302_mean_shift_exactly_at_z_max_is_tolerated():
    x = _column(32, 2)
    wide = {"r_min": 1e-9, "r_max": 1e9}
    z = _edge_value("BN302", "z", lambda: _norm(2, mean=-0.35), x, {"z_max": 0.0, **wide})
    assert _rs("BN302", _norm(2, mean=-0.35), x, {"z_max": z, **wide}) == []
    assert _rs("BN302", _norm(2, mean=-0.35), x, {"z_max": math.nextafter(z, 0), **wide})
    # at the edge with the variance ratio out of range: the message names the ratio alone
    (f,) = _rs("BN302", _norm(2, mean=-0.35), x, {"z_max": z, "r_min": 1e-9, "r_max": 1e-9})
    assert "mean shift" not in f.message and "variance ratio r=" in f.message
    # the ratio exactly at both ends of its range, with a mean shift: the message names the shift alone
    r = f.evidence["r"]
    (f,) = _rs("BN302", _norm(2, mean=-0.35), x, {"z_max": 0.0, "r_min": r, "r_max": r})
    assert "mean shift z=" in f.message and "variance ratio r=" not in f.message


def test_bn302_leaves_buffers_at_their_initial_values_to_bn303_and_bn303_leaves_moved_ones_to_bn302():
    x = _column(32, 2) * 2 + 1  # far from N(0, 1): both layers mismatch the data
    assert _rs("BN302", _norm(2, trained=True), x) == []
    assert [f.layer for f in _rs("BN303", _norm(2, trained=True), x)] == ["0"]
    assert _rs("BN303", _norm(2, mean=0.1, trained=True), x) == []
    assert [f.layer for f in _rs("BN302", _norm(2, mean=0.1, trained=True), x)] == ["0"]


def test_bn303_default_thresholds_and_min_samples():
    x = _column(32, 2)
    (f,) = _rs("BN303", _norm(2, trained=True), x + 0.35)  # z ~ 0.35, r ~ 1
    assert 0.34 < f.evidence["z"] < 0.36 and 0.9 < f.evidence["r"] < 1.1 and f.evidence["samples"] == 32
    assert _rs("BN303", _norm(2, trained=True), x + 0.1) == []  # z ~ 0.1, r ~ 1
    (f,) = _rs("BN303", _norm(2, trained=True), x * math.sqrt(2) + 0.1)  # r ~ 2, z ~ 0.1
    assert 1.9 < f.evidence["r"] < 2.1
    assert _rs("BN303", _norm(2, trained=True), (x * math.sqrt(2) + 0.1)[:31]) == []


def _with_other(change: str) -> nn.Module:
    """A BatchNorm at its initial values (constant gamma/beta) and another whose one sign of training is
    ``change``."""
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    with torch.no_grad():
        if change == "mean":
            model[1].running_mean.copy_(torch.tensor([0.0, 0.3]))
        elif change == "counter":
            model[1].num_batches_tracked.fill_(1)
    return model


@pytest.mark.parametrize("change", ["mean", "counter"])
def test_bn303_any_moved_buffer_shows_training(change):
    x = _column(32, 2) * 2 + 1
    assert _rs("BN303", _with_other("none"), x) == []  # a fresh model: nothing trained
    assert [f.layer for f in _rs("BN303", _with_other(change), x)] == ["0"]


def _regression(s2: float, d2: float) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Train mode reproduces x, eval mode x + d (running_mean -d): with targets x +- s the train-mode mean
    squared error is s**2 and the eval-mode one s**2 + d**2."""
    x = _column(64)
    e = torch.ones(64, 1)
    e[1::2] = -1
    return _norm(1, mean=-math.sqrt(d2)), (x, x + math.sqrt(s2) * e)


@pytest.mark.parametrize(("s2", "d2", "fires"), [
    (1.0, 1.0, True),     # ratio 2 (between 1.5 and twice that), delta 1
    (0.1, 0.15, True),    # ratio 2.5, delta 0.15 (between 0.1 and twice that)
    (0.01, 0.05, False),  # ratio 6 but delta 0.05: both must exceed
    (1.0, 0.3, False),    # delta 0.3 but ratio 1.3
])
def test_bn304_loss_needs_both_the_ratio_and_the_difference(s2, d2, fires):
    model, data = _regression(s2, d2)
    found = _rs("BN304", model, data)
    assert bool(found) == fires
    if found:
        ev = found[0].evidence
        assert ev["metric"] == "mse" and ev["train_accuracy"] is None and ev["eval_accuracy"] is None
        assert ev["train_loss"] == pytest.approx(s2, rel=1e-4) and ev["eval_loss"] == pytest.approx(s2 + d2, rel=1e-4)
        assert ev["loss_ratio"] == ev["eval_loss"] / ev["train_loss"]
        assert "mean squared error" in found[0].message and "accuracy" not in found[0].message


def test_bn304_loss_limits_are_tolerated_exactly_at_the_measured_values():
    model, data = _regression(0.1, 0.15)
    (f,) = _rs("BN304", copy.deepcopy(model), data)
    ratio, delta = f.evidence["loss_ratio"], f.evidence["eval_loss"] - f.evidence["train_loss"]
    assert _rs("BN304", copy.deepcopy(model), data, {"max_loss_ratio": ratio}) == []
    assert _rs("BN304", copy.deepcopy(model), data, {"max_loss_ratio": math.nextafter(ratio, 0)})
    assert _rs("BN304", copy.deepcopy(model), data, {"min_loss_delta": delta}) == []
    assert _rs("BN304", copy.deepcopy(model), data, {"min_loss_delta": math.nextafter(delta, 0)})


def test_bn304_a_train_mode_loss_of_zero_is_an_infinite_ratio():
    # a constant input: train mode normalizes it to beta = 0 exactly, the targets; eval mode gives 0.5
    x, target = torch.ones(64, 1), torch.zeros(64, 1)
    (f,) = _rs("BN304", _norm(1, mean=0.5), (x, target))
    assert f.evidence["train_loss"] == 0.0 and f.evidence["loss_ratio"] == math.inf
    assert f.evidence["eval_loss"] == pytest.approx(0.25, rel=1e-4)


def test_bn304_output_change_default_and_its_edge():
    (f,) = _rs("BN304", _norm(1, mean=-0.75), _column(64))  # eval = train + 0.75: RMS change 0.6 of eval's
    change = f.evidence["relative_change"]
    assert f.evidence["metric"] == "output" and 0.59 < change < 0.61
    assert _rs("BN304", _norm(1, mean=-0.75), _column(64), {"max_output_change": change}) == []
    assert _rs("BN304", _norm(1, mean=-0.75), _column(64), {"max_output_change": math.nextafter(change, 0)})


def _classifier(flipped: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Class 1 iff x > 0 in train mode (accuracy 1); eval mode adds d, moving the ``flipped`` negative
    samples nearest 0 to class 1."""
    x = _column(64)
    neg = sorted(float(v) for v in x[:, 0] if v < 0)[::-1]
    d = -(neg[flipped - 1] + neg[flipped]) / 2
    model = _norm(1, mean=-d, head=2)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-3.0], [3.0]]))
        model[1].bias.zero_()
    return model, (x, (x[:, 0] > 0).long())


def test_bn304_accuracy_drop_default_and_its_edge():
    model, data = _classifier(10)  # a drop of 10/64 = 0.156: between 0.1 and twice that
    loss_ok = {"max_loss_ratio": 1e9}
    (f,) = _rs("BN304", copy.deepcopy(model), data, loss_ok)
    ev = f.evidence
    assert ev["metric"] == "cross_entropy" and (ev["train_accuracy"], ev["eval_accuracy"]) == (1.0, 54 / 64)
    assert "accuracy 84.4% in eval mode vs 100.0% in train mode" in f.message and "cross-entropy" in f.message
    drop = ev["train_accuracy"] - ev["eval_accuracy"]
    assert _rs("BN304", copy.deepcopy(model), data, {**loss_ok, "max_accuracy_drop": drop}) == []
    assert _rs("BN304", copy.deepcopy(model), data, {**loss_ok, "max_accuracy_drop": math.nextafter(drop, 0)})
    small, data = _classifier(6)  # 6/64 = 0.094: within the default
    assert _rs("BN304", small, data, loss_ok) == []


# --- BN305 frozen-bn-drifts ------------------------------------------------------------------------------------
class _FrozenNorm(nn.Module):
    """A frozen BatchNorm under a trainable scalar temperature (one trainable element, or none)."""

    def __init__(self, trainable: bool = True, counter: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn = nn.Linear(64, 8), nn.BatchNorm1d(8)
        self.lin.requires_grad_(False)
        self.bn.requires_grad_(False)
        self.temperature = nn.Parameter(torch.ones(()), requires_grad=trainable)
        if not counter:
            self.bn.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)) / self.temperature


def test_bn305_a_model_given_in_eval_mode_with_anything_trainable_is_reported():
    (f,) = rule_findings("BN305", _FrozenNorm().eval(), X.digits())
    assert f.layer == "bn" and f.evidence["training"] is False and f.evidence["trainable_params"] == 1
    assert "will be in train mode after model.train()" in f.message and f.evidence["num_batches_tracked"] == [0, 1]
    assert rule_findings("BN305", _FrozenNorm(trainable=False).eval(), X.digits()) == []  # inference only


def test_bn305_a_layer_in_train_mode_is_reported_even_when_nothing_trains():
    (f,) = rule_findings("BN305", _FrozenNorm(trainable=False).train(), X.digits())
    assert f.evidence["training"] is True and f.evidence["trainable_params"] == 0 and "is in train mode" in f.message


def test_bn305_without_data_or_without_a_counter():
    (f,) = rule_findings("BN305", _FrozenNorm().train(), None, input_shape="64")
    assert "mean_shift" not in f.evidence and "one train-mode forward" not in f.message
    (f,) = rule_findings("BN305", _FrozenNorm(counter=False).train(), X.digits())
    assert f.evidence["mean_shift"] > 0 and "num_batches_tracked" not in f.evidence
