"""Edge cases of the BN1xx rules (rules/architecture.py, rules/layer_settings.py) and the rule machinery
(rules/base.py, rules/catalog.py, rules/common.py) that the mutation check (`tools/mutation.py`,
`docs/mutation.md`) found unpinned: each test decides a behaviour that a plausible one-token change would alter (a
threshold at its edge, an evidence value against a naive recomputation, an edge path). Real small models, real or
exactly constructed data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.rules import examples_architecture as A
from tests.rules.kills import rule_findings


def _bn_mlp(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 8, bias=False), bn, nn.ReLU(), nn.Linear(8, 2))


# --- BN106 suspicious momentum ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("momentum", "fires"), [(0.5, False), (0.75, True), (0.3, False), (None, False)])
def test_bn106_fires_above_the_default_max_momentum_only(momentum, fires):
    # the default max_momentum is 0.5, "above" it fires: exactly 0.5 (MorvanNet's bn_input) does not
    found = rule_findings("BN106", _bn_mlp(nn.BatchNorm1d(8, momentum=momentum)))
    assert [f.layer for f in found] == (["1"] if fires else [])


def test_bn106_at_a_configured_max_momentum_and_just_above_it():
    m = 0.6543217
    assert not rule_findings("BN106", _bn_mlp(nn.BatchNorm1d(8, momentum=m)), options={"max_momentum": m})
    (f,) = rule_findings("BN106", _bn_mlp(nn.BatchNorm1d(8, momentum=m)), options={"max_momentum": math.nextafter(m, 0)})
    assert f.evidence == {"momentum": m, "max_momentum": math.nextafter(m, 0), "pytorch_equivalent_of_keras": 0.345678}
    assert "momentum=0.654322" in f.message and "65% the latest batch" in f.message
    assert f.fix.startswith("set momentum=0.35 on 1")


def test_bn106_exact_evidence_of_keras_momentum():
    (f,) = rule_findings("BN106", A.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.99)))
    assert f.evidence["pytorch_equivalent_of_keras"] == round(1 - 0.99, 6) == 0.01
    assert f.severity == "warning" and "Keras's 0.99 is PyTorch's 0.01" in f.message


def test_bn106_momentum_zero_and_no_running_stats():
    (f,) = rule_findings("BN106", _bn_mlp(nn.BatchNorm1d(8, momentum=0.0)))
    assert f.evidence == {"momentum": 0.0} and "never update" in f.message
    assert f.fix.startswith("set momentum=0.1 (the default) on 1")
    # without running statistics momentum does nothing: left to BN107, whatever the momentum
    for m in (0.99, 0.0):
        assert not rule_findings("BN106", _bn_mlp(nn.BatchNorm1d(8, momentum=m, track_running_stats=False)))


def test_bn106_skips_unused_batchnorms_and_the_root_module():
    net = A.MorvanNet(do_bn=False)
    net.bn_input = nn.BatchNorm1d(1, momentum=0.99)  # never called: BN112's alone
    assert not rule_findings("BN106", net, A.scalar_x())
    net.do_bn = True
    assert [f.layer for f in rule_findings("BN106", net, A.scalar_x())] == ["bn_input"]
    # a model that is a BatchNorm has no layer name to report: the rules look at its submodules only
    assert not rule_findings("BN106", nn.BatchNorm1d(4, momentum=0.99), torch.randn(8, 4))


def test_bn107_only_batchnorms_without_running_stats():
    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                          nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2))
    (f,) = rule_findings("BN107", model)
    assert f.layer == "1" and f.evidence == {"track_running_stats": False}


# --- BN108 eps vs dtype -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("eps", "fires"), [(1e-3, False), (1.5e-3, False), (9e-4, True)])
def test_bn108_default_min_eps(eps, fires):
    assert bool(rule_findings("BN108", A.half_bn(eps))) == fires


def test_bn108_evidence_and_escalation_when_eps_rounds_to_zero():
    (f,) = rule_findings("BN108", A.half_bn(1e-5))
    info = torch.finfo(torch.bfloat16)
    assert f.severity == "warning" and f.layer == "1"
    assert f.evidence == {"eps": 1e-5, "dtype": "torch.bfloat16", "min_eps": 1e-3, "gain": (1 / 1e-5) ** 0.5,
                          "dtype_max": float(info.max), "dtype_smallest_normal": float(info.tiny),
                          "eps_rounds_to_zero": False}
    assert "scaled by 316x" in f.message and "rounds to 0" not in f.message
    assert f.fix == "construct 1 with eps=0.001 or keep it in float32"
    # 1e-8 is below float16's smallest subnormal (6e-8): it rounds to 0 and the finding is an error
    (g,) = rule_findings("BN108", _bn_mlp(nn.BatchNorm1d(8, eps=1e-8)).half(), options={"min_eps": 2e-3})
    assert g.severity == "error" and g.evidence["eps_rounds_to_zero"] is True and g.evidence["min_eps"] == 2e-3
    assert g.evidence["dtype"] == "torch.float16" and g.evidence["dtype_max"] == 65504.0
    assert "eps itself rounds to 0" in g.message


def test_bn108_at_a_configured_min_eps():
    assert not rule_findings("BN108", A.half_bn(1e-4), options={"min_eps": 1e-4})
    assert rule_findings("BN108", A.half_bn(1e-4), options={"min_eps": math.nextafter(1e-4, 1)})


def test_bn108_dtype_is_the_first_floating_tensor_of_the_layer():
    # an integer buffer first (the step counter moved ahead of the statistics) does not hide the bfloat16 ones
    bn = nn.BatchNorm1d(8, eps=1e-5, affine=False)
    for k in ("running_mean", "running_var"):
        t = getattr(bn, k)
        delattr(bn, k)
        bn.register_buffer(k, t)
    assert next(bn.buffers()).dtype == torch.long
    assert [f.layer for f in rule_findings("BN108", _bn_mlp(bn).to(torch.bfloat16))] == ["1"]
    # weight bfloat16, bias float32 (a model with no first layer to infer an input from: no forward pass, which
    # would refuse the mixed dtypes on CPU): the first floating tensor, the weight, decides
    for which, fires in (("weight", True), ("bias", False)):
        model = nn.Sequential(nn.BatchNorm1d(8, eps=1e-5), nn.ReLU())
        p = getattr(model[0], which)
        p.data = p.data.to(torch.bfloat16)
        assert [f.evidence["dtype"] for f in rule_findings("BN108", model)] == (["torch.bfloat16"] if fires else [])


# --- BN109 wrong axis ---------------------------------------------------------------------------------------------
class _Tokens(nn.Module):
    """Linear on (N, L, C) tokens, then BatchNorm1d; ``how`` says what happens between them."""

    def __init__(self, how: str, length: int = 6, features: int = 16) -> None:
        super().__init__()
        self.how = how
        self.proj = nn.Linear(12, features)
        bn = {"plain": length, "transpose": features, "view": length * features // 8}[how]
        self.bn = nn.BatchNorm1d(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.how == "transpose":
            return self.bn(h.transpose(1, 2))
        if self.how == "view":  # (N, L, C) -> (N, L*C/8, 8): the last axis is no longer the features
            return self.bn(h.reshape(h.shape[0], -1, 8))
        return self.bn(h)


def _tokens(length: int = 6) -> torch.Tensor:
    return torch.randn(8, length, 12, generator=torch.Generator().manual_seed(0))


def test_bn109_square_tokens_fire_only_without_a_transpose():
    # L == C == 16: after the transpose the last axis (L) happens to have the Linear's width, still silent
    assert not rule_findings("BN109", _Tokens("transpose", length=16), _tokens(16))
    (f,) = rule_findings("BN109", _Tokens("plain", length=16), _tokens(16))
    assert f.layer == "bn" and f.evidence == {"input_shape": [8, 16, 16], "num_features": 16, "producer": "proj",
                                              "producer_features": 16}


def test_bn109_a_reshape_that_moves_the_features_off_the_last_axis_is_silent():
    assert not rule_findings("BN109", _Tokens("view"), _tokens())


def test_bn109_evidence_names_the_producer_and_its_features():
    (f,) = rule_findings("BN109", _Tokens("plain"), _tokens())
    assert f.evidence == {"input_shape": [8, 6, 16], "num_features": 6, "producer": "proj", "producer_features": 16}
    assert "(8, 6, 16) from proj (Linear, 16 features" in f.message and "(size 6)" in f.message


class _WidthNamed(nn.Module):
    """Not a Linear, but with an ``out_features`` attribute: a 1x1 convolution whose channels (axis 1) are its
    width, written with its own weight (a leaf of the graph)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.out_features = width
        self.weight = nn.Parameter(torch.randn(width, width, 1, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv1d(x, self.weight)


class _ConvThenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = _WidthNamed(8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.mix(x))


def test_bn109_only_linear_and_embedding_say_features_are_last():
    # (N, C=8, L=8) from a conv-like block with out_features=8: channels on axis 1, as BatchNorm1d wants
    assert not rule_findings("BN109", _ConvThenBN(), torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)))


class _EmbedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.bn = nn.BatchNorm1d(7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bn(self.emb(ids))


def test_bn109_embedding_output_fires():
    ids = torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(0))
    (f,) = rule_findings("BN109", _EmbedBN(), ids)
    assert f.evidence["producer"] == "emb" and f.evidence["producer_features"] == 5


# --- BN111 eps too large ------------------------------------------------------------------------------------------
def _eps_bn(eps: float) -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(4, eps=eps), nn.Linear(4, 2))


def _pm(a: float, batches: int = 3, n: int = 8) -> list[torch.Tensor]:
    """Batches (a list: served in order) of n samples, half +a and half -a in every channel: each batch's
    population variance is a**2."""
    return [torch.tensor([a] * (n // 2) + [-a] * (n // 2)).unsqueeze(1).repeat(1, 4) for _ in range(batches)]


@pytest.mark.parametrize(("eps", "fires"), [(0.015, True), (0.01, True), (0.009, False)])
def test_bn111_default_max_eps_fires_at_and_above(eps, fires):
    found = rule_findings("BN111", _eps_bn(eps))
    assert [f.layer for f in found] == (["0"] if fires else [])
    if fires:
        assert found[0].evidence == {"eps": eps, "max_eps": 1e-2, "default_eps": 1e-5}


def test_bn111_at_a_configured_max_eps():
    assert rule_findings("BN111", _eps_bn(0.3), options={"max_eps": 0.3})
    assert not rule_findings("BN111", _eps_bn(0.3), options={"max_eps": math.nextafter(0.3, 1)})


@pytest.mark.parametrize(("eps", "keras"), [(0.4, False), (0.5, True), (0.8, True), (1.0, False), (1.5, False)])
def test_bn111_fix_reads_eps_in_0_5_to_1_as_keras_momentum(eps, keras):
    (f,) = rule_findings("BN111", _eps_bn(eps))
    assert (f"momentum={1 - eps:.2g}" in f.fix) == keras
    assert ("pass eps by keyword" in f.fix) == (not keras)


def test_bn111_with_data_quotes_the_exact_input_variance():
    (f,) = rule_findings("BN111", _eps_bn(0.02), _pm(0.5))
    ev = f.evidence
    assert ev["median_input_var"] == 0.25 and ev["variance_source"] == "data" and ev["variance_steps"] == 3
    assert ev["max_eps_to_var"] == 0.1 and ev["eps_to_var"] == 0.02 / 0.25
    assert "only 8.00% of the median input variance" in f.message
    # eps / var = 0.15 lies between the default max_eps_to_var (0.1) and twice it
    (g,) = rule_findings("BN111", _eps_bn(0.0375), _pm(0.5))
    assert "0.15x the median per-channel variance" in g.message and "barely normalizes" in g.message


def test_bn111_eps_to_var_share_at_its_edge():
    # var 0.25, share 0.5: eps 0.125 is exactly share * var: not above it
    (f,) = rule_findings("BN111", _eps_bn(0.125), _pm(0.5), options={"max_eps_to_var": 0.5})
    assert "only 50.00%" in f.message
    (g,) = rule_findings("BN111", _eps_bn(0.125), _pm(0.5),
                     options={"max_eps_to_var": math.nextafter(0.5, 0)})
    assert "0.5x the median per-channel variance" in g.message


def test_bn111_zero_input_variance():
    (f,) = rule_findings("BN111", _eps_bn(0.8), [torch.ones(8, 4)] * 2)
    assert f.evidence["median_input_var"] == 0.0 and f.evidence["eps_to_var"] == float("inf")
    assert "zero variance on this data" in f.message


def test_bn111_skips_non_finite_batches_and_stays_static_when_none_is_left():
    x = _pm(0.5)
    x[1] = x[1].clone()
    x[1][0, 0] = float("nan")  # one NaN: the second batch's statistics are not finite, the step is left out
    (f,) = rule_findings("BN111", _eps_bn(0.8), x)
    assert f.evidence["variance_steps"] == 2 and f.evidence["median_input_var"] == 0.25
    (g,) = rule_findings("BN111", _eps_bn(0.8), [torch.full((8, 4), float("nan"))] * 2)
    assert g.evidence == {"eps": 0.8, "max_eps": 1e-2, "default_eps": 1e-5}


def _recorded(model: nn.Module, batches: list[torch.Tensor]):
    """A history of train-mode forwards of ``model`` on ``batches`` (no optimizer step: the input of a first-layer
    BatchNorm is the data itself)."""
    from bnaudit.recording import record

    model.train()
    with record(model) as rec:
        for b in batches:
            model(b)
            rec.step()
    return rec.history


def test_bn111_variance_from_a_recorded_history_without_data():
    model = _eps_bn(0.8)
    history = _recorded(model, _pm(0.5, batches=2) + _pm(1.0, batches=1))
    (f,) = rule_findings("BN111", model, history=history)
    ev = f.evidence
    assert ev["variance_source"] == "history" and ev["variance_steps"] == 3
    assert ev["median_input_var"] == pytest.approx((0.25 + 0.25 + 1.0) / 3, rel=1e-6)
    assert "history)" in f.message
    # data, when given, is measured first; data with no finite step falls back to the history
    (g,) = rule_findings("BN111", model, _pm(0.5), history=history)
    assert g.evidence["variance_source"] == "data" and g.evidence["median_input_var"] == 0.25
    (h,) = rule_findings("BN111", model, [torch.full((8, 4), float("nan"))] * 2, history=history)
    assert h.evidence["variance_source"] == "history" and h.evidence["variance_steps"] == 3


# --- BN112 unused normalization -----------------------------------------------------------------------------------
def test_bn112_counts_the_parameters_of_an_unused_layer():
    (f,) = rule_findings("BN112", A.MorvanNet(), A.scalar_x())
    assert f.evidence == {"type": "BatchNorm1d", "owner": "MorvanNet", "attribute": "bn_input", "parameters": 2,
                          "graph_method": "fx", "recorded_steps": None}
    assert "its 2 parameters get no gradient" in f.message and "recorded steps" not in f.message


# --- BN101 redundant bias -----------------------------------------------------------------------------------------
def test_bn101_evidence_and_fix():
    (f,) = rule_findings("BN101", A.mlp(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), A.x())
    assert f.layer == "0" and f.evidence == {"bias_values": 8, "feeds": ["1"]}
    assert f.fix == "construct 0 with bias=False; the BatchNorm's beta already provides the shift"
    assert "Linear 0 has a bias of 8 values that BatchNorm1d 1 subtracts away again" == f.message


# --- the rule machinery: Rule.finding -----------------------------------------------------------------------------
def test_finding_severity_configured_over_escalated_over_default():
    model = _bn_mlp(nn.BatchNorm1d(8, eps=1e-8)).half()  # eps rounds to 0 in float16: escalated to error
    assert [f.severity for f in rule_findings("BN108", model)] == ["error"]
    config = {"BN108": {"severity": "info"}}
    [f] = bnaudit.inspect(model, select=["BN108"], rule_config=config).findings
    assert f.severity == "info"
    [g] = bnaudit.inspect(A.half_bn(1e-5), select=["BN108"], rule_config=config).findings
    assert g.severity == "info"
    assert [f.severity for f in rule_findings("BN108", A.half_bn(1e-5))] == ["warning"]
    # a rule's own fix when the finding gives none, the finding's when it does
    (h,) = rule_findings("BN109", _Tokens("plain"), _tokens())
    assert h.fix == bnaudit.rules.catalog.get_rule("BN109").fix


# --- rules/common.py: the shared batches ---------------------------------------------------------------------------
class _Versioned(nn.Module):
    """An integer parameter (a frozen version counter) registered before the float layers."""

    def __init__(self) -> None:
        super().__init__()
        self.version = nn.Parameter(torch.tensor([3]), requires_grad=False)
        self.net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_shared_batches_take_the_dtype_of_the_first_floating_parameter():
    # the batches stay float32: cast to the integer parameter's dtype the train-mode pass would fail
    assert not rule_findings("BN302", _Versioned(), _x4())


class _SyncTokens(nn.Module):
    """``_Tokens("plain")`` after ``convert_sync_batchnorm``: a SyncBatchNorm (run without a process group, as
    plain batch norm) gets the (N, L, C) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.bn = nn.SyncBatchNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.proj(x))


def test_bn109_a_sync_batchnorm_on_tokens_fires_too():
    (f,) = rule_findings("BN109", _SyncTokens(), _tokens())
    assert f.layer == "bn" and f.evidence["input_shape"] == [8, 6, 16] and f.evidence["producer_features"] == 16
    # 4-D input to a BatchNorm2d after a Linear on its last axis: not BN109's case
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm2d(3))
    assert not rule_findings("BN109", model, torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)))


# --- BN101: a bias whose output feeds nothing ----------------------------------------------------------------------
class _DeadBranch(nn.Module):
    """``aux`` (with a bias) runs but its output is dropped: it has no consumer at all."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(10, 4)
        self.fc = nn.Linear(10, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux(x)
        return self.bn(self.fc(x))


def test_bn101_a_layer_with_no_consumer_is_not_reported():
    assert not rule_findings("BN101", _DeadBranch(), A.x())


# --- BN102 placement ----------------------------------------------------------------------------------------------
class _FunctionalAfterBN(nn.Module):
    def __init__(self, first_relu: bool = False) -> None:
        super().__init__()
        self.first_relu = first_relu
        self.bn = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_relu:  # the input itself, through F.relu, into the BatchNorm
            return self.head(self.bn(torch.relu(x)))
        return self.head(torch.relu(self.bn(x)))


def test_bn102_names_a_functional_activation_before_the_batchnorm():
    (f,) = rule_findings("BN102", A.BiasTo(activation=True), A.x())
    assert f.layer == "bn" and f.evidence == {"placement": "after-activation", "policy": "before-activation",
                                              "activation": "F.relu"}
    assert "output of an activation (F.relu)" in f.message
    (g,) = rule_findings("BN102", _FunctionalAfterBN(first_relu=True), A.x())
    assert g.evidence["activation"] == "F.relu"
    (h,) = rule_findings("BN102", A.mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)), A.x())
    assert h.evidence["activation"] == "ReLU" and h.layer == "2"


def test_bn102_after_activation_policy():
    after = {"placement": "after-activation"}
    (f,) = rule_findings("BN102", _FunctionalAfterBN(), A.x(), options=after)  # BatchNorm -> F.relu
    assert f.layer == "bn" and f.evidence == {"placement": "before-activation", "policy": "after-activation"}
    assert f.fix.startswith("move the BatchNorm after the activation")
    # a BatchNorm whose output is the model's output feeds no activation (and no layer)
    assert not rule_findings("BN102", A.mlp(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2)), A.x(),
                         options=after)
    assert not rule_findings("BN102", _FunctionalAfterBN(first_relu=True), A.x(), options=after)


# --- BN103 norm on output -----------------------------------------------------------------------------------------
class _ResidualOut(nn.Module):
    """The output is ``x + ...``: the walk back from the output reaches the input itself."""

    def __init__(self, bn_last: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 10, bias=False)
        self.bn = nn.BatchNorm1d(10)
        self.bn_last = bn_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x)) if self.bn_last else self.fc(self.bn(x))
        return x + torch.relu(h) + torch.sigmoid(h)


def test_bn103_walks_back_through_parameter_free_ops_to_the_input():
    assert not rule_findings("BN103", _ResidualOut(bn_last=False), A.x())
    (f,) = rule_findings("BN103", _ResidualOut(bn_last=True), A.x())  # reached along two paths: one finding
    assert f.layer == "bn" and f.evidence == {"output_shape": [16, 10]}
    assert f.fix == "remove bn; the output layer should be the last Linear/Conv"


# --- BN104 dropout before BatchNorm -------------------------------------------------------------------------------
class _SoftmaxBetween(nn.Module):
    """Dropout -> Linear -> nn.Softmax -> Linear -> BatchNorm: the softmax re-estimates the scale."""

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.a, self.soft = nn.Dropout(0.3), nn.Linear(10, 8), nn.Softmax(dim=1)
        self.b, self.bn = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.b(self.soft(self.a(self.drop(x)))))


def test_bn104_stops_at_a_softmax_module():
    assert not rule_findings("BN104", _SoftmaxBetween(), A.x())


def test_bn104_one_batchnorm_message_and_no_functional_false_alarm():
    model = A.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                  nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    (f,) = rule_findings("BN104", model, A.x())
    assert f.layer == "3" and f.evidence == {"dropout": "3", "p": 0.3, "batchnorms": ["5"], "path": ["4"]}
    assert "3 (p=0.3) feeds 5 through 4:" in f.message
    # F.relu straight into a BatchNorm is no functional dropout
    assert not rule_findings("BN104", A.BiasTo(activation=True), A.x())


# --- BN105 reused BatchNorm ---------------------------------------------------------------------------------------
class _TwiceBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 10, bias=False)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.bn(self.fc(x))))


def test_bn105_a_batchnorm_called_twice():
    (f,) = rule_findings("BN105", _TwiceBN(), A.x())
    assert f.layer == "bn" and f.evidence == {"calls": 2} and "called 2 times" in f.message


# --- BN110 no normalization ---------------------------------------------------------------------------------------
def _linears(n: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Linear(10, 10), nn.ReLU()] if i < n - 1 else [nn.Linear(10, 2)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize(("weight_layers", "fires"), [(5, True), (4, False)])
def test_bn110_default_min_hidden_layers(weight_layers, fires):
    found = rule_findings("BN110", _linears(weight_layers), A.x())
    assert [f.evidence for f in found] == ([{"hidden_layers": 4, "min_hidden_layers": 4}] if fires else [])


def test_bn110_counts_hidden_weight_layers_exactly():
    (f,) = rule_findings("BN110", _linears(3), A.x(), options={"min_hidden_layers": 2})
    assert f.evidence["hidden_layers"] == 2 and f.message.startswith("2 hidden Linear/Conv layers")
    assert not rule_findings("BN110", _linears(1), A.x(), options={"min_hidden_layers": 1})  # the output layer only
    assert not rule_findings("BN110", _linears(3), A.x(), options={"min_hidden_layers": 3})


def test_bn110_an_unused_norm_does_not_count():
    found = rule_findings("BN110", A.MorvanNet(do_bn=False), A.scalar_x())
    assert [f.evidence for f in found] == [{"hidden_layers": 5, "min_hidden_layers": 4}]
    assert not rule_findings("BN110", A.MorvanNet(do_bn=True), A.scalar_x())


# --- the rule machinery: options, registration, look-up, selection -------------------------------------------------
from bnaudit.errors import ConfigError, UsageError  # noqa: E402
from bnaudit.rules.base import Rule, find_registered, matches, register  # noqa: E402
from bnaudit.rules.catalog import get_rule, select_rules, validate_patterns  # noqa: E402
from bnaudit.rules.common import name_list  # noqa: E402


class _Typed(Rule):
    """A rule class never registered: option types the shipped rules do not use (bool, a tuple of types)."""

    code, name, severity, summary, fix = "BN990", "typed-options", "info", "typed options", "none"
    options = {"flag": bool, "count": int, "ratio": float, "either": (int, float), "label": str}
    defaults = {"flag": False, "count": 1, "ratio": 0.5, "either": 1, "label": "a"}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("flag", True, True), ("count", 3, 3), ("ratio", 2, 2.0), ("ratio", 0.25, 0.25), ("either", 2, 2),
    ("either", 2.5, 2.5), ("label", "b", "b"),
])
def test_resolve_options_accepts_and_converts(key, value, expected):
    got = _Typed.resolve_options({key: value})
    assert got[key] == expected and type(got[key]) is type(expected)
    assert {k: v for k, v in got.items() if k != key} == {k: v for k, v in _Typed.defaults.items() if k != key}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("count", True, "BN990 option 'count' must be int, got True"),
    ("ratio", True, "BN990 option 'ratio' must be float, got True"),
    ("ratio", "high", "BN990 option 'ratio' must be float, got 'high'"),
    ("count", 2.0, "BN990 option 'count' must be int, got 2.0"),
    ("label", 3, "BN990 option 'label' must be str, got 3"),
    ("either", "x", "BN990 option 'either' must be int or float, got 'x'"),
    ("flag", 1, "BN990 option 'flag' must be bool, got 1"),
    ("nope", 1, "BN990 has no option 'nope' (options: count, either, flag, label, ratio)"),
])
def test_resolve_options_refuses(key, value, message):
    with pytest.raises(ConfigError) as err:
        _Typed.resolve_options({key: value})
    assert str(err.value) == message


def test_resolve_options_of_shipped_rules():
    assert get_rule("BN102").resolve_options({"placement": "any"}) == {"placement": "any"}
    with pytest.raises(ConfigError, match="must be one of \\['before-activation', 'after-activation', 'any'\\]"):
        get_rule("BN102").resolve_options({"placement": "before"})
    assert get_rule("BN106").resolve_options({"max_momentum": 1}) == {"max_momentum": 1.0}
    with pytest.raises(ConfigError, match=r"BN101 has no option 'x' \(options: none\)"):
        get_rule("BN101").resolve_options({"x": 1})
    with pytest.raises(ConfigError, match=r"\(options: max_momentum\)"):
        get_rule("BN106").resolve_options({"x": 1})


def test_rule_doc_is_its_docstring():
    assert get_rule("BN101").doc().startswith("Linear/Conv with ``bias=True`` whose output goes straight into")


def _rule_class(**attrs):
    base = {"code": "BN991", "name": "never-registered", "severity": "info", "summary": "s", "fix": "f"}
    return type("Candidate", (Rule,), {**base, **attrs})


@pytest.mark.parametrize(("attrs", "message"), [
    ({"summary": ""}, "rule Candidate lacks the class attribute 'summary'"),
    ({"code": "BX101"}, "rule code 'BX101' must look like BN123"),
    ({"name": "Not_Kebab"}, "rule name 'Not_Kebab' must be kebab-case"),
    ({"code": "BN101"}, "rule code BN101 is registered twice (RedundantBias, Candidate)"),
    ({"name": "redundant-bias"}, "rule name 'redundant-bias' is registered twice (BN101, BN991)"),
    ({"requires": frozenset({"graph", "gpu"})}, "rule BN991 requires unknown capabilities ['gpu']"),
    ({"options": {"k": int}}, "rule BN991 options ['k'] have no default"),
])
def test_register_refuses(attrs, message):
    with pytest.raises(ValueError) as err:
        register(_rule_class(**attrs))
    assert str(err.value) == message
    assert find_registered("BN991") is None and find_registered("never-registered") is None


def test_find_registered_by_code_any_case_or_name():
    assert find_registered("bn101").code == "BN101"
    assert find_registered(" redundant-bias ").code == "BN101"
    assert find_registered("Redundant-Bias") is None and find_registered("BN999") is None


@pytest.mark.parametrize(("patterns", "expected"), [
    (["BN101"], True), (["bn1"], True), (["BN"], True), (["redundant-bias"], True), (["BN10*"], True),
    (["*01"], True), (["BN2"], False), (["eps-too-large"], False), ([""], False), (["", " BN101 "], True),
    ([], False), (["BN102", "redundant-bias"], True),
])
def test_matches(patterns, expected):
    assert matches("BN101", "redundant-bias", patterns) is expected


def test_get_rule_suggests_the_closest_code():
    assert get_rule("redundant-bias").code == "BN101"
    with pytest.raises(UsageError) as err:
        get_rule("redundant-bais")
    assert str(err.value) == "no rule 'redundant-bais' (did you mean 'redundant-bias'?); `bnaudit rules` lists them"
    with pytest.raises(UsageError) as err:
        get_rule("zzzz")
    assert str(err.value) == "no rule 'zzzz'; `bnaudit rules` lists them"


def test_validate_patterns_and_select_rules():
    assert validate_patterns(["BN101", " ", "bn-after-activation"], "--select") == ["BN101", "bn-after-activation"]
    with pytest.raises(UsageError, match="--ignore 'BN9' matches no rule"):
        validate_patterns(["BN9"], "--ignore")
    every = [r.code for r in select_rules()]
    assert every == sorted(every) and {"BN101", "BN112", "BN201", "BN301"} <= set(every)
    assert [r.code for r in select_rules(["BN101", "eps-too-large"])] == ["BN101", "BN111"]
    assert [r.code for r in select_rules(["BN10"], ["BN105", "BN106"])] == ["BN101", "BN102", "BN103", "BN104",
                                                                            "BN107", "BN108", "BN109"]
    assert [r.code for r in select_rules(ignore=["BN1", "BN2", "BN3"])] == [c for c in every if c >= "BN4"]


def test_name_list_limit():
    names = [f"l{i}" for i in range(8)]
    assert name_list(names[:6]) == "l0, l1, l2, l3, l4, l5"
    assert name_list(names[:7]) == "l0, l1, l2, l3, l4, l5 and 1 more"
    assert name_list(names, limit=2) == "l0, l1 and 6 more"


def test_bn111_a_history_without_per_channel_records_uses_the_layer_variance():
    from bnaudit.recording import record

    model = _eps_bn(0.8)
    with record(model, per_channel=False) as rec:
        for b in _pm(0.5, batches=2) + _pm(1.0, batches=1):
            model(b)
            rec.step()
    assert rec.history.series("0", "channel_var").shape == (3, 1)  # one column: the variance of all values
    (f,) = rule_findings("BN111", model, history=rec.history)
    assert f.evidence["median_input_var"] == pytest.approx(0.5, rel=1e-6) and f.evidence["variance_steps"] == 3


class _BigBatchOnly(nn.Module):
    """Normalizes only batches of more than 8 samples (fx cannot trace the branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4, eps=0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.bn(h) if h.shape[0] > 8 else h


def test_bn111_a_history_that_never_saw_the_layer_gives_no_variance():
    model = _BigBatchOnly()
    history = _recorded(model, _pm(0.5, n=4))  # batches of 4: bn never runs in the recorded steps
    # the data (16 samples: bn runs) has no finite statistic, so the history is asked, and has no bn
    (f,) = rule_findings("BN111", model, [torch.full((16, 4), float("nan"))], history=history)
    assert f.layer == "bn" and f.evidence == {"eps": 0.8, "max_eps": 1e-2, "default_eps": 1e-5}


class _LinearWithHead(nn.Linear):
    """A model that is itself a Linear (a subclass) with one more Linear inside."""

    def __init__(self) -> None:
        super().__init__(10, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x))


def test_bn110_counts_submodules_only():
    # the model itself is not one of its layers: one weight layer (head), no hidden one
    assert not rule_findings("BN110", _LinearWithHead(), A.x(), options={"min_hidden_layers": 1})
    # nor is it a normalization layer of itself: a bare RmsNorm has no hidden layers and no normalization
    (f,) = rule_findings("BN110", A.RmsNorm(10), A.x(), options={"min_hidden_layers": 0})
    assert f.evidence == {"hidden_layers": 0, "min_hidden_layers": 0}


# --- BN101-BN105: the cases each condition alone keeps silent -----------------------------------------------------
@pytest.mark.parametrize(("code", "model"), [
    ("BN101", lambda: A.BiasTo(residual=True)),  # not every consumer is the BatchNorm
    ("BN101", lambda: A.mlp(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))),  # a ReLU module
    ("BN101", lambda: A.BiasTo(activation=True)),  # an edge to the BatchNorm through F.relu
    ("BN102", lambda: A.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))),
    ("BN103", lambda: A.mlp(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))),
    ("BN104", lambda: A.mlp(nn.Dropout(0.0), nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2))),
    ("BN105", lambda: A.SharedBN(shared=False)),
])
def test_bn10x_silent_cases(code, model):
    assert not rule_findings(code, model(), A.x())


def test_bn103_through_a_softmax_module():
    model = A.mlp(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.BatchNorm1d(2), nn.Softmax(dim=1))
    assert [f.layer for f in rule_findings("BN103", model, A.x())] == ["3"]


# --- rules/common.py: the recalibrate command a BN3xx fix quotes ----------------------------------------------------
@pytest.mark.parametrize(("name", "shown"), [
    ("model.py:build_model", "model.py:build_model"),  # a MODEL spec with a factory
    ("models/net.pt", "models/net.pt"),
    ("Net", "MODEL"),  # a class name, not a spec
    ("my models/net.pt", "MODEL"),  # a space: not one shell word
])
def test_recalibrate_command_quotes_only_a_retypeable_model_spec(name, shown):
    model = _bn_mlp(nn.BatchNorm1d(8))
    model[0] = nn.Linear(4, 8, bias=False)
    with torch.no_grad():  # running statistics far from the data's: BN302 fires and quotes the command
        model[1].running_mean.fill_(10.0)
        model[1].num_batches_tracked.fill_(100)
    (f,) = rule_findings("BN302", model.eval(), _x4(), name=name)
    assert f.fix.split("`")[1] == f"bnaudit recalibrate {shown} --data DATA -o recalibrated.pt"


def _x4() -> torch.Tensor:
    return torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
