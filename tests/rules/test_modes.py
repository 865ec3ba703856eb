"""BN3xx through ``bnaudit.inspect``: each rule's evidence carries the numbers and thresholds, the corrected
twin is clean, the fix names the change (and ``bnaudit recalibrate`` where it repairs), and the user's model is
bit-identical after the audit. The generic example test (tests/rules/test_examples.py) covers fire/no-fire of
every rule's own cases; these tests look inside the findings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.rules import examples_modes as R
from bnaudit.rules import get_rule
from bnaudit.transforms.recalibrate import recalibrate
from tests.fixtures.architectures import BY_NAME


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: [p.requires_grad for p in m.parameters(recurse=False)] for n, m in model.named_modules()},
    )


def _assert_unchanged(model, snap):
    state, flags, grads = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: [p.requires_grad for p in m.parameters(recurse=False)] for n, m in model.named_modules()} == grads


def _hits(report, code):
    return [f for f in report.findings if f.code == code]


def test_bn301_and_bn306_predict_without_eval():
    model = R.trained_mlp()
    snap = _snapshot(model)
    rng = torch.get_rng_state()
    report = bnaudit.inspect(model, R.digits(), predict=R.predict_no_eval, select=["BN301", "BN306"])
    _assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    (bn301,) = _hits(report, "BN301")
    assert bn301.severity == "error" and bn301.layer is None
    ev = bn301.evidence
    assert ev["relative_delta"] > ev["tolerance"] == 1e-4
    assert ev["max_abs_delta"] > 0 and ev["output_scale"] > 0 and ev["inference_path"] == "predict"
    assert ev["train_mode_layers"] == ["1", "4"] and "single_sample_error" in ev
    assert "model.eval()" in bn301.fix and "predict()" in bn301.fix
    (bn306,) = _hits(report, "BN306")
    changed = bn306.evidence["changed"]
    assert set(changed) == {"1", "4"}
    before, after = changed["1"]["num_batches_tracked"]
    assert after == before + bn306.evidence["calls"] == before + 2
    assert "model.eval()" in bn306.fix and "bnaudit recalibrate" in bn306.fix
    assert "test data leaks" in bn306.message


def test_model_evaluated_at_load_is_judged_in_eval_mode():
    # The serving recipe: model.eval(); model.requires_grad_(False) once at load, and a predict() under
    # torch.inference_mode() that never calls eval() itself. Nothing is wrong with it as served.
    arch = BY_NAME["served_cnn"]
    model = arch.build()
    snap = _snapshot(model)
    report = bnaudit.inspect(model, arch.example(), predict=arch.predict, select=["BN3"])
    _assert_unchanged(model, snap)
    assert {"BN301", "BN306", "BN308"} <= set(report.rules_run)
    assert not [f for f in report.findings if f.severity != "info"], [(f.code, f.message) for f in report.findings]
    (note,) = _hits(report, "BN308")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert note.severity == "info" and note.evidence["train_mode_layers"] == bns and "model.eval()" in note.fix
    # the same predict() on the same model straight out of training: there the errors are real
    trained = bnaudit.inspect(
        arch.build().train(), arch.example(), predict=arch.predict, select=["BN301", "BN306", "BN308"]
    )
    assert sorted(f.code for f in trained.findings) == ["BN301", "BN306"]
    assert all(f.severity == "error" for f in trained.findings)


def test_bn301_bn306_corrected_predict_and_tolerance_option():
    clean = bnaudit.inspect(R.trained_mlp(), R.digits(), predict=R.predict_eval, select=["BN301", "BN306"])
    assert set(clean.rules_run) == {"BN301", "BN306"} and not clean.findings
    # a tolerance above the measured change silences the output comparison; the single-sample failure remains
    loose = bnaudit.inspect(
        R.trained_mlp(), R.digits(), predict=R.predict_no_eval, select=["BN301"],
        rule_config={"BN301": {"options": {"tolerance": 1e9}}},
    )
    (f,) = _hits(loose, "BN301")
    assert "fails on a batch of one sample" in f.message


def test_bn301_batch_dependence_that_only_co_batches_show():
    # BatchNorm2d left in train mode: a batch of one sample runs (64 values per channel), so only the change
    # between co-batches decides. It is far above the noise and well below 1: a tolerance raised to 1.0, or a
    # probe that ran this model in eval mode instead of the mode it was given in, would miss it.
    from bnaudit.probes.inference import cobatch_invariance

    x, _ = R.digits()
    res = cobatch_invariance(R.trained_cnn(), [x[:32]], R.predict_no_eval, tolerance=1e-4)
    assert res.single_sample_error is None and res.compared == (8, 8, 1)
    assert 1e-2 < res.relative < 0.8 and res.noise is not None and res.noise < 1e-5 and res.changed
    report = bnaudit.inspect(R.trained_cnn(), R.digits(), predict=R.predict_no_eval, select=["BN301"])
    (f,) = _hits(report, "BN301")
    assert f.evidence["train_mode_layers"] == ["2"] and "single_sample_error" not in f.evidence
    assert f.evidence["numerical_noise"] < 1e-5 and f.evidence["noise_margin"] == 4


def test_bn301_weighs_changes_against_the_models_own_numerical_noise():
    # A 12-block pre-norm transformer whose Linear layers round as a GPU's TF32 tensor cores do above 32 rows
    # and not below: the same sample alone and in a co-batch differs by more than 1e-4 with no batch
    # dependence at all. The noise the probe measures explains it; the rule stays silent.
    from bnaudit.probes.inference import cobatch_invariance

    arch = BY_NAME["vit_prenorm_tf32"]
    res = cobatch_invariance(arch.build(), [arch.example()], tolerance=1e-4)
    assert res.relative > 1e-4 and res.noise >= res.relative / 4 and res.changed is False
    report = bnaudit.inspect(arch.build(), arch.example(), select=["BN301"])
    assert "BN301" in report.rules_run and not report.findings, [f.message for f in report.findings]
    exact = cobatch_invariance(BY_NAME["vit_prenorm"].build(), [arch.example()], tolerance=1e-4)
    assert exact.relative < 1e-6 and exact.noise is None  # the float32 twin: nothing to explain


def test_bn301_untracked_layer_names_the_layer_and_the_repairs():
    report = bnaudit.inspect(R.untracked_mlp(), R.digits(), select=["BN301"])
    (f,) = _hits(report, "BN301")
    assert f.layer == "1" and f.evidence["track_running_stats"] is False
    assert f.evidence["inference_path"] == "eval-forward"
    assert "track_running_stats=True" in f.fix and "bnaudit recalibrate" in f.fix and "swap-norm" in f.fix


def test_bn302_shifted_data_then_recalibrated():
    model = R.trained_mlp()
    snap = _snapshot(model)
    report = bnaudit.inspect(model, R.shifted_digits(), select=["BN302", "BN304"])
    _assert_unchanged(model, snap)
    hits = _hits(report, "BN302")
    assert [f.layer for f in hits] == ["1"]  # the second layer sees re-normalized inputs: it still fits
    ev = hits[0].evidence
    assert ev["z"] > ev["z_max"] == 0.25 and ev["r"] > ev["r_max"] == 1.4
    assert ev["samples"] == 256 and ev["channels"] == 32
    assert "bnaudit recalibrate" in hits[0].fix
    (gap,) = _hits(report, "BN304")
    assert gap.evidence["eval_loss"] > gap.evidence["train_loss"]
    # the repair the finding names: recalibrate on the shifted domain, and both warnings go away
    fixed, table = recalibrate(model, R.shifted_digits())
    assert table.row("1").z_before > 1 and table.row("1").z_after < 1e-5
    again = bnaudit.inspect(fixed, R.shifted_digits(), select=["BN302", "BN304"])
    assert not again.findings


def test_bn302_thresholds_are_options():
    strict = bnaudit.inspect(
        R.trained_mlp(), R.digits(), select=["BN302"], rule_config={"BN302": {"options": {"z_max": 0.001}}}
    )
    assert {f.layer for f in _hits(strict, "BN302")} == {"1", "4"}
    assert all(f.evidence["z_max"] == 0.001 for f in strict.findings)


def test_bn303_ema_without_buffers_then_update_bn():
    report = bnaudit.inspect(R.ema_params_only(), R.digits(), select=["BN303", "BN302", "BN304"])
    bn303 = _hits(report, "BN303")
    assert {f.layer for f in bn303} == {"1", "4"}
    f = bn303[0]
    assert f.severity == "error" and f.evidence["num_batches_tracked"] == 0 and f.evidence["affine_trained"]
    assert "update_bn" in f.fix and "bnaudit recalibrate" in f.fix
    assert not _hits(report, "BN302")  # buffers at their initial values are BN303's, not reported twice
    (gap,) = _hits(report, "BN304")
    ev = gap.evidence
    assert ev["eval_loss"] > 3 * ev["train_loss"] and ev["eval_accuracy"] < ev["train_accuracy"]
    assert ev["max_loss_ratio"] == 1.5 and ev["metric"] == "cross_entropy"
    clean = bnaudit.inspect(R.ema_with_update_bn(), R.digits(), select=["BN303", "BN302", "BN304"])
    assert not clean.findings


def test_bn303_data_that_matches_initial_values_is_not_reported():
    # standard-normal input straight into a BatchNorm whose buffers are 0/1: nothing to fix there
    first = torch.nn.Sequential(torch.nn.BatchNorm1d(64))
    gen = torch.Generator().manual_seed(1)
    first[0].weight.data.uniform_(1.5, 2.5, generator=gen)  # trained-looking affine: channels apart
    first[0].bias.data.uniform_(-0.1, 0.1, generator=gen)
    data = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    report = bnaudit.inspect(first, data, select=["BN303"])
    assert "BN303" in report.rules_run and not report.findings
    shifted = bnaudit.inspect(first, data * 3 + 1, select=["BN303"])  # the same layer on other data: reported
    assert [f.layer for f in shifted.findings] == ["0"]


@pytest.mark.parametrize("name", ["resnet_zero_init", "resnet_bottleneck_zero_init"])
def test_fresh_resnet_with_zero_initialised_gammas_is_not_trained(name):
    # torchvision's zero_init_residual (timm's zero_init_last): gamma = 0 on each block's last BatchNorm. The
    # model is fresh: its statistics were never estimated because nothing was trained, which is no bug.
    arch = BY_NAME[name]
    model = arch.build()
    assert any(float(m.weight.detach().abs().max()) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    report = bnaudit.inspect(model, arch.example(), select=["BN302", "BN303", "BN304"])
    assert {"BN302", "BN303", "BN304"} <= set(report.rules_run)
    assert not report.findings, [(f.code, f.layer) for f in report.findings]
    # the same architecture after one optimizer step is trained, and its never-estimated statistics are BN303's
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    nn.functional.cross_entropy(model(arch.example()), torch.arange(4)).backward()
    opt.step()
    model.load_state_dict(buffers, strict=False)  # weights stepped, buffers as they were (an EMA of parameters)
    trained = bnaudit.inspect(model, arch.example() * 2 + 1, select=["BN303"])
    assert trained.findings and all(f.severity == "error" for f in trained.findings)


def test_bn305_frozen_backbone_evidence_and_fixes():
    model = R.frozen_backbone()
    snap = _snapshot(model)
    report = bnaudit.inspect(model, R.digits(), select=["BN305"])
    _assert_unchanged(model, snap)
    hits = {f.layer: f for f in _hits(report, "BN305")}
    assert set(hits) == {"backbone.1", "backbone.4"}
    ev = hits["backbone.1"].evidence
    assert ev["training"] and ev["mean_shift"] > 0 and ev["var_ratio"] > 1 and ev["trainable_params"] == 330
    assert ev["num_batches_tracked"][1] == ev["num_batches_tracked"][0] + 1
    assert "FrozenBatchNorm2d" in hits["backbone.1"].fix and "train()" in hits["backbone.1"].fix
    # without data the rule still sees it (statically)
    static = bnaudit.inspect(R.frozen_backbone(), None, select=["BN305"], input_shape="64")
    assert {f.layer for f in _hits(static, "BN305")} == {"backbone.1", "backbone.4"}
    assert "mean_shift" not in _hits(static, "BN305")[0].evidence


def test_bn307_recorded_run():
    model, history = R._recorded_run(False)
    report = bnaudit.inspect(R.left_in_eval(), None, select=["BN307"], history=history, input_shape="64")
    (f,) = _hits(report, "BN307")
    ev = f.evidence
    assert f.layer is None and ev["layers"] == ["1", "4"]
    assert (ev["first_step"], ev["last_step"], ev["eval_steps"], ev["trained_steps"]) == (16, 39, 24, 40)
    assert ev["num_batches_tracked_stalled_at"] == 16 and ev["confirmed_by_counter"]
    assert "model.train()" in f.fix and "step 16" in f.fix
    fine = bnaudit.inspect(
        R.switched_back(), None, select=["BN307"], history=R._recorded_run(True)[1], input_shape="64"
    )
    assert "BN307" in fine.rules_run and not fine.findings
    tolerant = bnaudit.inspect(
        R.left_in_eval(), None, select=["BN307"], history=history, input_shape="64",
        rule_config={"BN307": {"options": {"min_steps": 25}}},
    )
    assert not tolerant.findings
    skipped = bnaudit.inspect(R.left_in_eval(), None, select=["BN307"], input_shape="64")
    assert "BN307" in skipped.rules_skipped


def test_bn307_counts_a_batchnorm_without_affine_parameters():
    # BatchNorm1d(affine=False) has no weights of its own, yet left in eval mode while the model trains it
    # normalizes with stalled running statistics all the same.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, affine=False), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with bnaudit.record(model) as rec:
        for step in range(12):
            model(torch.randn(32, 8, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 4:
                model.eval()  # a validation pass that never switches back
            rec.step()
    assert rec.history.bn_info["1"]["affine"] is False
    report = bnaudit.inspect(model, None, select=["BN307"], history=rec.history, input_shape="8")
    (f,) = _hits(report, "BN307")
    assert f.layer == "1" and f.evidence["eval_steps"] == 7 and f.evidence["trained_steps"] == 12
    assert "while the model was being trained" in f.message


def test_every_bn3_rule_documents_options_and_cases():
    for code in ("BN301", "BN302", "BN303", "BN304", "BN305", "BN306", "BN307", "BN308"):
        rule = get_rule(code)
        doc = rule.doc()
        assert "Bad:" in doc and "Good:" in doc, code
        for option, default in rule.defaults.items():
            assert f"{option}: " in doc, (code, option)
            assert rule.resolve_options({})[option] == default
        assert rule.family == "modes"


def test_whole_family_leaves_the_user_model_bit_identical():
    model = R.trained_mlp()
    snap = _snapshot(model)
    report = bnaudit.inspect(model, R.shifted_digits(), predict=R.predict_no_eval, select=["BN3"])
    _assert_unchanged(model, snap)
    assert {"BN301", "BN302", "BN304", "BN306"} <= {f.code for f in report.findings}
    assert not [c for c, why in report.rules_skipped.items() if "internal error" in why]


@pytest.mark.parametrize("code", ["BN301", "BN306"])
def test_predict_that_raises_is_a_data_error(code):
    def broken(model, x):
        raise RuntimeError("shape mismatch in my predict")

    with pytest.raises(bnaudit.BnauditError, match="predict\\(\\) raised"):
        bnaudit.inspect(R.trained_mlp(), R.digits(), predict=broken, select=[code])


def test_bn302_needs_enough_samples_to_judge():
    x, y = R.shifted_digits()
    few = bnaudit.inspect(R.trained_mlp(), (x[:20], y[:20]), select=["BN302"])
    assert "BN302" in few.rules_run and not few.findings
    allowed = bnaudit.inspect(
        R.trained_mlp(), (x[:20], y[:20]), select=["BN302"], rule_config={"BN302": {"options": {"min_samples": 8}}}
    )
    assert [f.layer for f in allowed.findings] == ["1"] and allowed.findings[0].evidence["samples"] == 20


class _Squeezed(torch.nn.Module):
    """A model whose output loses its batch dimension for a single sample (``squeeze()``), nothing to do
    with normalization."""

    def __init__(self) -> None:
        super().__init__()
        self.net = R.trained_mlp()

    def forward(self, x):
        return self.net(x).squeeze()


def test_bn301_ignores_single_sample_failures_unrelated_to_batchnorm():
    report = bnaudit.inspect(_Squeezed(), R.digits(), predict=R.predict_eval, select=["BN301"])
    assert "BN301" in report.rules_run and not report.findings
