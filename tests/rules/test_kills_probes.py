"""Edge cases of the inference, train/eval and eval-step probes (probes/inference.py, probes/train_eval.py,
probes/eval_steps.py) that the mutation check (`tools/mutation.py`, `docs/mutation.md`) found
unpinned: each test decides a behaviour that a plausible one-token change would alter (a threshold at its edge, an
evidence value against a naive recomputation, an edge path). Real small models, real or exactly constructed data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.loading.data import Batch
from bnaudit.probes.eval_steps import eval_mode_steps, history_eval_mode_steps
from bnaudit.probes.inference import cobatch_invariance, predict_mutations, predict_train_mode_layers
from bnaudit.probes.running_stats import train_mode_pass
from bnaudit.probes.train_eval import frozen_bn_drift, train_eval_gap
from bnaudit.rules import examples_modes as XM
from tests.rules.kills import features


def _linear(seed: int = 0, f: int = 4, out: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(f, out)).eval()


class _Counted:
    """An iterable of batches that counts how many of them were drawn."""

    def __init__(self, batches: list) -> None:
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


# --- cobatch_invariance (BN301): pooling, co-batch sizes, comparisons -------------------------------------------
def test_cobatch_sizes_by_pooled_samples_and_cobatch_size():
    model = _linear()
    # (pooled samples, cobatch_size) -> the co-batch sizes compared: the reference, a disjoint one, the sample alone
    cases = {(2, 8): (2, 1), (3, 8): (2, 2, 1), (4, 8): (2, 2, 1), (5, 8): (3, 3, 1), (6, 8): (3, 3, 1),
             (7, 8): (4, 4, 1), (15, 8): (8, 8, 1), (20, 8): (8, 8, 1), (20, 2): (2, 2, 1), (20, 1): (2, 2, 1),
             (20, 3): (3, 3, 1), (4, 3): (2, 2, 1), (5, 3): (3, 3, 1)}
    for (n, size), compared in cases.items():
        assert cobatch_invariance(model, [features(n)], cobatch_size=size).compared == compared, (n, size)
    assert cobatch_invariance(model, [features(20)]).compared == (8, 8, 1)  # the default co-batch holds 8 samples


def test_cobatch_draws_only_the_batches_it_needs():
    model = _linear()
    # cobatch_size 2 needs 3 samples: two batches of 2 give 4 (both drawn, the third never is)
    batches = _Counted([features(2, seed=s) for s in range(4)])
    assert cobatch_invariance(model, batches, cobatch_size=2).compared == (2, 2, 1)
    assert batches.drawn == 2
    # exactly enough in the first batch: the second is never drawn
    batches = _Counted([features(3, seed=s) for s in range(3)])
    assert cobatch_invariance(model, batches, cobatch_size=2).compared == (2, 2, 1)
    assert batches.drawn == 1
    # an empty batch is skipped, not counted as the pool
    assert cobatch_invariance(model, [features(0), features(3)], cobatch_size=2).compared == (2, 2, 1)


def test_cobatch_of_one_sample_is_not_run():
    res = cobatch_invariance(_linear(), [features(1)], lambda m, x: m(x))
    assert res.note == "needs at least two samples" and res.compared == () and res.used_predict is True
    assert res.max_abs_delta == 0.0 and res.scale == 0.0 and res.relative == 0.0
    assert cobatch_invariance(_linear(), []).used_predict is False
    ok = cobatch_invariance(_linear(), [features(2)])
    assert ok.note == "" and ok.used_predict is False and ok.changed is None and ok.noise is None


def test_cobatch_seeds_zero_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    x = features(6)

    def draws(**kw):
        return cobatch_invariance(model, [x], XM.predict_no_eval, **kw).scale

    assert draws() == draws(seed=0) != draws(seed=1)


class _SimilarityHead(nn.Module):
    """Each sample's output is its similarity to every sample of the batch: (N, N), one row per sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ x.T


def test_cobatch_output_of_another_shape_is_an_infinite_change():
    res = cobatch_invariance(_SimilarityHead(), [features(2)])
    assert res.compared == (2, 1) and res.max_abs_delta == math.inf and res.relative == math.inf


class _Empty(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


def test_cobatch_of_an_output_without_values_changes_by_zero():
    res = cobatch_invariance(_Empty(), [features(5)])
    assert res.compared == (3, 3, 1) and res.max_abs_delta == 0.0 and res.scale == 0.0 and res.relative == 0.0


class _NoSingles(nn.Module):
    """Batch-independent, but refuses a batch of one sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            raise ValueError("needs two samples")
        return 2.0 * x


def test_cobatch_when_a_single_sample_raises():
    res = cobatch_invariance(_NoSingles(), [features(5)])
    assert res.compared == (3, 3) and res.single_sample_error and "needs two samples" in res.single_sample_error
    assert res.max_abs_delta == 0.0 and res.relative == 0.0
    # with any tolerance, even one below zero, the missing single-sample output is not compared
    for tolerance in (0.0, -1.0):
        res = cobatch_invariance(_NoSingles(), [features(5)], tolerance=tolerance)
        assert res.changed is False and res.compared == (3, 3)
        assert res.noise == (0.0 if tolerance < 0 else None)  # below zero, the co-batch noise is measured


def test_cobatch_no_change_at_tolerance_zero_measures_no_noise():
    # an elementwise model: every co-batch gives the sample bit-identical outputs, a change of exactly 0
    res = cobatch_invariance(_NoSingles(), [features(5)], tolerance=0.0)
    assert res.max_abs_delta == 0.0 and res.changed is False and res.noise is None
    res = cobatch_invariance(nn.Sequential(nn.Tanh()), [features(5)], tolerance=0.0)
    assert res.compared == (3, 3, 1) and res.max_abs_delta == 0.0 and res.changed is False and res.noise is None


class _Untracked(nn.Module):
    """A BatchNorm without running statistics over (N, 2, 3): batch statistics in eval mode too, and one sample
    has three values per channel, so a single sample normalizes over itself."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.reshape(-1, 2, 3))


def test_cobatch_two_samples_single_comparison_alone_decides():
    # two samples: no disjoint co-batch, so the sample alone against the pair is the only comparison; the
    # sample repeated twice has its own statistics, as alone: noise ~0, the change is real
    x = features(2, f=6, seed=3)
    res = cobatch_invariance(_Untracked().eval(), [x], tolerance=1e-3)
    assert res.compared == (2, 1) and res.max_abs_delta > 0.1
    assert res.changed is True and res.noise is not None and res.noise < 1e-5
    assert res.batch_stat_layers == ("bn",) and res.untracked_layers == ("bn",) and res.train_mode_layers == ()


def test_cobatch_batch_dependence_beats_the_measured_noise():
    res = cobatch_invariance(_Untracked().eval(), [features(9, f=6, seed=4)], tolerance=1e-3)
    assert res.compared == (5, 5, 1) and res.changed is True and res.noise is not None and res.noise < 1e-5


class _BatchSum(nn.Module):
    """y_i = x_i + alpha * sum_j x_j + beta * i: batch dependence through the sum (alpha), and a position effect
    (beta) that looks like noise to the probe, since moving the sample within its co-batch changes it."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[0], dtype=x.dtype)[:, None]
        return x + self.alpha * x.sum(0, keepdim=True) + self.beta * pos


def test_cobatch_change_must_exceed_four_times_the_noise_by_default():
    x = torch.tensor([[1.0], [2.0], [3.0]])  # reference [0, 1], disjoint [0, 2], moved [1, 0] (sample 0 last)
    # the disjoint co-batch changes the sample by alpha * |x1 - x2| = 0.01; moving it changes it by beta = 0.01 / 6;
    # the sample alone changes by alpha * x1 = 0.02 and repeated twice by alpha * x0 = 0.01 (noise, too large)
    model = _BatchSum(0.01, 0.01 / 6)
    res = cobatch_invariance(model, [x], tolerance=1e-3)
    scale = 1.0 + 0.01 * 3.0
    assert res.scale == pytest.approx(scale, rel=1e-6) and res.max_abs_delta == pytest.approx(0.02, rel=1e-4)
    assert res.changed is True and res.noise == pytest.approx(0.01 / scale, rel=1e-4)
    assert cobatch_invariance(model, [x], tolerance=1e-3, noise_margin=8.0).changed is False  # 6x is not 8x
    assert cobatch_invariance(model, [x], tolerance=0.03).changed is False  # 0.01 / 1.03 is within it


def test_cobatch_a_change_exactly_at_the_margin_times_the_noise_does_not_count():
    # powers of two keep every output exact: y = x + x.sum() / 4 (+ position / 16)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    # disjoint co-batch: 2.0 against 1.75, a change of 1/4; moving the sample last: 1/16 more, so 4 x noise = 1/4
    res = cobatch_invariance(_BatchSum(0.25, 0.0625), [x], tolerance=0.01)
    assert res.max_abs_delta == 0.5 and res.changed is False  # the sample alone (1.25): 1/2 against 2 x 1/4 noise
    assert cobatch_invariance(_BatchSum(0.25, 0.0625), [x], tolerance=0.01, noise_margin=3.9).changed is True
    # two samples: only the sample alone, 1/2 away, its noise 1/4 (the sample twice: 1.5); at a margin of 2: a tie
    pair = cobatch_invariance(_BatchSum(0.25, 0.0), [x[:2]], tolerance=0.01, noise_margin=2.0)
    assert pair.compared == (2, 1) and pair.max_abs_delta == 0.5 and pair.changed is False
    assert cobatch_invariance(_BatchSum(0.25, 0.0), [x[:2]], tolerance=0.01, noise_margin=1.9).changed is True


def test_cobatch_measures_noise_only_for_the_comparisons_that_ran():
    # a position effect alone; with two samples there is no disjoint co-batch, so moving the sample is never
    # measured, even with a tolerance below zero that every comparison exceeds
    res = cobatch_invariance(_BatchSum(0.0, 0.5), [torch.tensor([[1.0], [2.0]])], tolerance=-1.0)
    assert res.compared == (2, 1) and res.noise == 0.0 and res.changed is False
    # outputs below 1: the relative change is still the change over the scale (1/16 over 7/32)
    small = cobatch_invariance(_BatchSum(0.25, 0.0), [torch.tensor([[0.125], [0.25]])])
    assert small.scale == 0.21875 and small.max_abs_delta == 0.0625 and small.relative == 0.0625 / 0.21875


class _LpNormalize(nn.Module):
    """Not a dropout layer, though it has a ``p`` (the norm's order)."""

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, p=self.p, dim=1)


def test_cobatch_names_each_layer_by_what_it_does_in_its_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.BatchNorm1d(6, track_running_stats=False),
                          nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Dropout(0.5), _LpNormalize(), nn.Linear(6, 2))
    model.eval()
    model[3].train()  # tracked, in train mode
    model[5].train()  # the only active dropout
    model[6].train()
    res = cobatch_invariance(model, [features(6)], XM.predict_no_eval)  # keeps the modes as given
    assert res.batch_stat_layers == ("2", "3") and res.train_mode_layers == ("3",) and res.untracked_layers == ("2",)
    assert res.active_dropout == ("5",) and res.used_predict is True
    # without a predict the path is an eval-mode forward: only the untracked layer uses batch statistics
    plain = cobatch_invariance(model, [features(6)])
    assert plain.batch_stat_layers == ("2",) and plain.train_mode_layers == () and plain.active_dropout == ()


# --- predict_train_mode_layers (BN308) ----------------------------------------------------------------------------
def test_predict_train_mode_layers_calls_predict_once_on_the_first_two_samples_seeded_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Unflatten(1, (2, 2)),
                          nn.InstanceNorm1d(2, track_running_stats=True))  # running statistics, but no BatchNorm
    seen = []

    def predict(m, x):
        seen.append((x.clone(), torch.rand(1)))
        return m(x)

    x = features(2)
    assert predict_train_mode_layers(model, x, predict) == ("1",)  # a batch of two is enough
    ((inputs, draw),) = seen
    assert torch.equal(inputs, x[:2])
    torch.manual_seed(0)
    assert torch.equal(draw, torch.rand(1))  # seeded with 0 by default
    predict_train_mode_layers(model, features(5), predict)
    assert torch.equal(seen[1][0], features(5)[:2])
    assert predict_train_mode_layers(model, features(1), predict) == () and len(seen) == 2  # one sample: not called


# --- predict_mutations (BN306) ------------------------------------------------------------------------------------
def _bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()


def test_predict_mutations_runs_two_batches_by_default_and_counts_their_samples():
    res = predict_mutations(_bn(), [features(8, seed=s) for s in range(4)], XM.predict_no_eval)
    assert res.calls == 2 and res.samples == 16 and res.used_predict is True and res.note == ""
    assert res.changes[0].num_batches_tracked == (0, 2)
    three = predict_mutations(_bn(), [features(8, seed=s) for s in range(4)], XM.predict_no_eval, max_calls=3)
    assert three.calls == 3 and three.samples == 24


def test_predict_mutations_without_batches():
    res = predict_mutations(_bn(), [])
    assert res.note == "no batches" and res.calls == 0 and res.samples == 0 and res.used_predict is False
    assert res.changes == ()
    eval_path = predict_mutations(_bn(), [features(8)])
    assert eval_path.used_predict is False and eval_path.changes == () and eval_path.calls == 1


def test_predict_mutations_counts_no_samples_for_inputs_without_a_batch_dimension():
    res = predict_mutations(_bn(), [torch.tensor(1.0), torch.tensor(2.0)], lambda m, x: x)
    assert res.calls == 2 and res.samples == 0 and res.changes == ()


class _Counter(nn.Module):
    """A hand-written normalization that counts its calls in a buffer named like BatchNorm's counter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked += 1
        return x - x.mean(0)


def test_predict_mutations_reads_counters_of_batchnorms_only():
    model = nn.Sequential(nn.Linear(4, 4), _Counter())
    (change,) = predict_mutations(model, [features(8)], XM.predict_no_eval).changes
    assert change.layer == "1" and change.buffers == ("num_batches_tracked",) and change.num_batches_tracked is None
    assert change.max_abs_delta == 0.0  # an integer counter has no float change


def test_predict_mutations_buffers_added_removed_or_resized_are_infinite_changes():
    def added(model, x):
        model[1].register_buffer("extra", torch.zeros(2))
        return model.eval()(x)

    def removed(model, x):
        del model[1]._buffers["running_var"]
        return model[0](x)

    def resized(model, x):
        model[1].running_mean = torch.zeros(8)
        return model[0](x)

    for predict, name in ((added, "extra"), (removed, "running_var"), (resized, "running_mean")):
        (change,) = predict_mutations(_bn(), [features(8)], predict).changes
        assert change.buffers == (name,) and change.max_abs_delta == math.inf, name


# --- train_eval_gap (BN304): which metric, and each against a naive recomputation ---------------------------------
def _bn_head(out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, out))


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x).double(), copy.deepcopy(model).train()(x).double()


def _metric(model: nn.Module, x: torch.Tensor, y) -> str:
    return train_eval_gap(model, [Batch(x, y) if y is not None else x]).metric


def test_train_eval_gap_metric_by_targets_and_output():
    x, head = features(8, seed=6), _bn_head()
    classes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2])
    assert _metric(head, x, classes) == "cross_entropy"  # 0 and 2 = C - 1 both allowed
    assert _metric(head, x, None) == "output"
    assert _metric(head, x, classes - 1) == "output"  # -1 is no class (an ignore index)
    assert _metric(head, x, classes + 1) == "output"  # 3 is no class of 3
    assert _metric(head, x, nn.functional.one_hot(classes, 3)) == "output"  # integer one-hot: no class indices
    assert _metric(head, x, classes[:4]) == "output"  # not one target per sample
    assert _metric(head, x, torch.zeros(8, 3)) == "mse"
    assert _metric(head, x, torch.zeros(8, 2)) == "output"  # float targets of another size
    assert _metric(head, x, torch.zeros(8, dtype=torch.complex64)) == "output"
    assert _metric(head, x, torch.zeros(8, 3, dtype=torch.complex64)) == "output"
    flat = nn.Sequential(_bn_head(1), nn.Flatten(0))  # a 1-D output (N,) with float targets (N,)
    assert _metric(flat, x, torch.zeros(8)) == "mse"
    assert _metric(flat, x, torch.zeros(8, dtype=torch.long)) == "output"


def test_train_eval_gap_cross_entropy_against_a_naive_recomputation():
    head, classes = _bn_head(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 2, 1, 1])
    xs = [features(10, seed=7), features(6, seed=8)]
    ys = [classes, classes[:6]]
    res = train_eval_gap(head, [Batch(x, y) for x, y in zip(xs, ys)])
    loss = {"eval": 0.0, "train": 0.0}
    right = {"eval": 0.0, "train": 0.0}
    for x, y in zip(xs, ys):
        for mode, out in zip(("eval", "train"), _outputs(head, x)):
            for i in range(len(y)):
                loss[mode] += float(torch.logsumexp(out[i], 0) - out[i, y[i]])
                right[mode] += float(int(out[i].argmax()) == int(y[i]))
    assert res.metric == "cross_entropy" and res.batches == 2 and res.samples == 16
    assert res.train_value == pytest.approx(loss["train"] / 16, rel=1e-9)
    assert res.eval_value == pytest.approx(loss["eval"] / 16, rel=1e-9)
    assert res.relative_change == pytest.approx((loss["eval"] - loss["train"]) / loss["train"], rel=1e-9)
    assert res.train_accuracy == right["train"] / 16 and res.eval_accuracy == right["eval"] / 16


def test_train_eval_gap_mse_against_a_naive_recomputation():
    head = _bn_head(2)
    x, y = features(12, seed=9), 0.3 * features(12, f=2, seed=10)
    e, t = _outputs(head, x)
    res = train_eval_gap(head, [Batch(x, y)])
    train_v, eval_v = float(((t - y.double()) ** 2).mean()), float(((e - y.double()) ** 2).mean())
    assert 0 < train_v < 1  # the relative change divides by it
    assert res.metric == "mse" and res.batches == 1 and res.samples == 12
    assert res.train_value == pytest.approx(train_v, rel=1e-9) and res.eval_value == pytest.approx(eval_v, rel=1e-9)
    assert res.relative_change == pytest.approx((eval_v - train_v) / train_v, rel=1e-9)
    assert res.train_accuracy is None and res.eval_accuracy is None


def test_train_eval_gap_output_rms_of_both_modes():
    head = _bn_head(2)
    x = features(12, seed=11, scale=2.0)
    e, t = _outputs(head, x)
    res = train_eval_gap(head, [x, x[:1]])  # the batch of one is skipped
    assert res.batches == 1 and res.samples == 12
    assert res.train_value == pytest.approx(float(t.pow(2).mean().sqrt()), rel=1e-9)
    assert res.eval_value == pytest.approx(float(e.pow(2).mean().sqrt()), rel=1e-9)


def test_train_eval_gap_zero_losses():
    # train-mode outputs that are the targets exactly: a train loss of 0, any eval loss is an infinite change
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
    x = features(8, f=3, seed=12)
    with torch.no_grad():
        y = copy.deepcopy(bn).train()(x)
    res = train_eval_gap(bn, [Batch(x, y)])
    assert res.metric == "mse" and res.train_value == 0.0 and res.eval_value > 0 and res.relative_change == math.inf
    # both losses 0 (an all-zero head, zero targets): no change
    zero = _bn_head(2)
    with torch.no_grad():
        zero[1].weight.zero_()
        zero[1].bias.zero_()
    res = train_eval_gap(zero, [Batch(x[:, :2].repeat(1, 2), torch.zeros(8, 2))])
    assert res.metric == "mse" and res.train_value == res.eval_value == 0.0 and res.relative_change == 0.0


def test_train_eval_gap_output_that_is_zero_in_eval_mode_is_an_infinite_change():
    # running statistics far above the data: eval-mode outputs are negative, zero after the ReLU; train mode's aren't
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
    res = train_eval_gap(nn.Sequential(bn, nn.ReLU()), [features(8, f=3, seed=13)])
    assert res.metric == "output" and res.eval_value == 0.0 and res.train_value > 0 and res.relative_change == math.inf


class _ByMode(nn.Module):
    """Returns its output in one mode of its BatchNorm only (as detection models return different things in train
    and eval mode), ``None`` in the other."""

    def __init__(self, in_train: bool) -> None:
        super().__init__()
        self.bn, self.in_train = nn.BatchNorm1d(4), in_train

    def forward(self, x: torch.Tensor):
        return self.bn(x) if self.bn.training == self.in_train else None


class _WidthByMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) if self.bn.training else self.bn(x)[:, :2]


def test_train_eval_gap_skips_batches_without_comparable_outputs():
    note = "no batch of two or more samples with a usable output"
    for model in (_ByMode(True), _ByMode(False), _WidthByMode(), _Empty()):
        res = train_eval_gap(model, [features(8)])
        assert res.note == note and res.batches == 0 and res.samples == 0, model
        assert res.metric == "output" and res.train_value == res.eval_value == res.relative_change == 0.0


def test_train_eval_gap_takes_boolean_labels_as_classes_0_and_1():
    # cross_entropy refuses bool targets: the probe used to raise on a binary task labelled with booleans
    head, x = _bn_head(2), features(8, seed=17)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    res = train_eval_gap(head, [Batch(x, labels)])
    ref = train_eval_gap(head, [Batch(x, labels.long())])
    assert res.metric == "cross_entropy" and res == ref


def test_train_eval_gap_keeps_the_first_batchs_metric():
    head = _bn_head(2)
    x = features(8, seed=14)
    res = train_eval_gap(head, [Batch(x, torch.zeros(8, 2)), x, Batch(x, torch.ones(8, 2))])
    assert res.metric == "mse" and res.batches == 2 and res.samples == 16  # the batch without targets is left out
    e, t = _outputs(head, x)
    expected = (float((e**2).sum() + ((e - 1) ** 2).sum()) / 32, float((t**2).sum() + ((t - 1) ** 2).sum()) / 32)
    assert (res.eval_value, res.train_value) == pytest.approx(expected, rel=1e-9)


def test_train_eval_gap_uses_the_train_pass_it_is_given():
    head = _bn_head(2)
    calls = []
    head.register_forward_hook(lambda m, a, o: calls.append(m.training))
    batches = [features(8, seed=15), features(8, seed=16)]
    given = train_mode_pass(head, batches)
    calls.clear()
    res = train_eval_gap(head, batches, train_pass=given)
    assert calls == [False, False]  # the eval passes only
    assert res.train_value == pytest.approx(train_eval_gap(head, batches).train_value, rel=1e-12)
    calls.clear()
    train_eval_gap(head, batches)
    assert len(calls) == 4


# --- frozen_bn_drift (BN305) --------------------------------------------------------------------------------------
class _Frozen(nn.Module):
    """Six BatchNorms: a (frozen, train mode), b (trainable), c (frozen, no running statistics), d (frozen, eval,
    kept in eval by ``train()``), e (frozen, in train mode as given though ``train()`` would keep it in eval),
    f (frozen, in eval mode as given, put in train mode by ``train()``); a dropout before them all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)
        self.a, self.b, self.c = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False)
        self.d, self.e, self.f = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        for m in (self.a, self.c, self.d, self.e, self.f):
            m.requires_grad_(False)
        for m in (self.a, self.b, self.d, self.e, self.f):
            m.running_var.fill_(0.25)  # below 1: the shift divides by sqrt(0.25 + eps)
        self.train()
        self.e.train()
        self.f.eval()

    def train(self, mode: bool = True) -> _Frozen:
        super().train(mode)
        self.d.eval()
        self.e.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.lin(x))
        for m in (self.a, self.b, self.c, self.d, self.e, self.f):
            h = m(h)
        return h


def test_frozen_bn_drift_layers_and_drift_against_a_naive_recomputation():
    model, x = _Frozen(), features(8, seed=18, scale=3.0)
    res = frozen_bn_drift(model, x)
    assert res.frozen_total == 5 and res.trainable_params == 4 * 4 + 4 + 2 * 4 and res.forward_ran
    assert [(lay.layer, lay.training_now, lay.training_after_train) for lay in res.layers] == [
        ("a", True, True), ("e", True, False), ("f", False, True)]
    naive = copy.deepcopy(model).train()
    before = {n: (m.running_mean.double().clone(), m.running_var.double().clone()) for n, m in naive.named_children()
              if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None}
    torch.manual_seed(0)  # the probe seeds the dropout with 0
    with torch.no_grad():
        naive(x)
    for lay in res.layers:
        m, (rm0, rv0) = getattr(naive, lay.layer), before[lay.layer]
        rm1, rv1 = m.running_mean.double(), m.running_var.double()
        shift = float(((rm1 - rm0).abs() / torch.sqrt(rv0 + m.eps)).max())
        ratio = float(torch.maximum((rv0 + m.eps) / (rv1 + m.eps), (rv1 + m.eps) / (rv0 + m.eps)).max())
        moved = not (torch.equal(rm0, rm1) and torch.equal(rv0, rv1))
        assert (lay.moved, lay.num_batches_tracked) == (moved, (0, 0 if lay.layer == "e" else 1)), lay.layer
        assert lay.mean_shift == pytest.approx(shift, rel=1e-9) and lay.var_ratio == pytest.approx(ratio, rel=1e-9)
    assert [lay.moved for lay in res.layers] == [True, False, True]  # e stays in eval mode in the forward


def test_frozen_bn_drift_without_a_usable_batch_measures_nothing():
    for batch in (None, features(1, seed=19)):  # a batch of one sample cannot normalize in train mode
        res = frozen_bn_drift(_Frozen(), batch)
        assert not res.forward_ran and [lay.layer for lay in res.layers] == ["a", "e", "f"]
        assert all(lay.moved is None and lay.mean_shift is None and lay.var_ratio is None
                   and lay.num_batches_tracked is None for lay in res.layers)
    assert frozen_bn_drift(_Frozen(), features(2, seed=19)).forward_ran  # two samples are enough


def test_frozen_bn_drift_with_nothing_frozen_or_nothing_that_drifts():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert frozen_bn_drift(plain, features(8)) == type(frozen_bn_drift(plain))((), 0, 28, False)
    untracked = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False).requires_grad_(False))
    res = frozen_bn_drift(untracked, features(8))
    assert res.layers == () and res.frozen_total == 1 and res.trainable_params == 20 and not res.forward_ran


def _exact_bn(mean: float, var: float) -> nn.Module:
    bn = nn.BatchNorm1d(1, momentum=0.5).requires_grad_(False)
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
    return bn.train()


def test_frozen_bn_drift_moved_when_either_buffer_moves():
    x = torch.tensor([[-1.0], [0.0], [1.0]])  # batch mean 0, unbiased variance 1, exactly
    only_mean = frozen_bn_drift(_exact_bn(1.0, 1.0), x).layers[0]  # mean 1 -> 0.5, variance stays 1
    assert only_mean.moved is True and only_mean.var_ratio == 1.0
    only_var = frozen_bn_drift(_exact_bn(0.0, 4.0), x).layers[0]  # mean stays 0, variance 4 -> 2.5
    assert only_var.moved is True and only_var.mean_shift == 0.0
    still = frozen_bn_drift(_exact_bn(0.0, 1.0), x).layers[0]
    assert still.moved is False and still.mean_shift == 0.0 and still.var_ratio == 1.0
    assert still.num_batches_tracked == (0, 1)


# --- eval_mode_steps (BN307) --------------------------------------------------------------------------------------
def _span(flags, counts=None, grads=None, updated=None, steps=None):
    steps = list(steps or range(10, 10 + len(flags)))
    spans = eval_mode_steps(steps, {"bn": flags}, {"bn": grads or [True] * len(flags)},
                            {"bn": counts} if counts is not None else None, updated)
    return spans[0] if spans else None


def test_eval_mode_steps_counts_only_trained_steps_with_a_stalled_counter():
    F, T = False, True
    # the counter advances at step 11 (a validation switch: the forward ran in train mode), stalls at 12 and 13;
    # at 14 it advances in train mode, at 15 it stalls again
    span = _span([T, F, F, F, T, F], [0, 1, 1, 1, 2, 2])
    assert span.steps == (12, 13, 15) and (span.first, span.last) == (12, 15) and span.stalled_at == 1
    assert span.confirmed and span.total_steps == 6 and span.trained_steps == 6
    # a counter that gets running statistics at step 11: its first value compares with nothing before it
    assert _span([F, F, F], [-1, 5, 5]).steps == (12,)
    # a counter shorter than the flags: the steps past it are not judged
    assert _span([F, F, F, F], [3, 3]).steps == (11,)
    # frozen affine parameters, or no optimizer step, at a step: not counted, nor trained
    span = _span([F, F, F, F], [0, 0, 0, 0], grads=[T, F, T, T], updated=[T, T, F, T])
    assert span.steps == (13,) and span.trained_steps == 2
    assert _span([F, F], [0, 0], updated=[T, T]).steps == (11,)


def test_eval_mode_steps_without_a_counter_counts_every_eval_step_unconfirmed():
    span = _span([True, False, False, True, False])
    assert span.steps == (11, 12, 14) and not span.confirmed and span.stalled_at is None
    assert (span.first, span.last) == (11, 14)
    assert _span([True, True]) is None


def test_history_eval_mode_steps_needs_a_recorded_history():
    class OnlyLayers:
        bn_layers: list = []

    class OnlyModes:
        def bn_modes(self, layer):
            raise AssertionError

    for history in (OnlyLayers(), OnlyModes(), object()):
        with pytest.raises(TypeError, match="not a recorded History"):
            history_eval_mode_steps(history)


def test_history_eval_mode_steps_skips_frozen_affine_and_counts_affine_free_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with bnaudit.record(model) as rec:
        for step in range(4):
            model(features(8, seed=step)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 0:
                model.eval()
            rec.step()
    spans = history_eval_mode_steps(rec.history)
    assert [s.layer for s in spans] == ["2"] and spans[0].steps == (1, 2, 3) and spans[0].trained_steps == 4
    assert [s.layer for s in history_eval_mode_steps(rec)] == ["2"]  # the recorder itself will do
