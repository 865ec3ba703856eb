"""``bnaudit.watch()`` on correct training scripts written the way real projects write them
(``tests/scripts/rw_*.py``): none of them may get a finding. Each test names what fired before the fix it pins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnaudit
from tests.fixtures.drifting import sigmoid_mlp, train_on_shifting_inputs
from tests.watching.helpers import watch_script


def _clean(script: str, *args: str, steps: list[int] | None = None):
    w, outcome = watch_script(script, *args)
    assert outcome.code == 0 and outcome.exc is None, outcome.exc
    assert [(r.model, [(f.code, f.layer, f.message) for f in r.findings]) for r in w.reports] == \
        [(r.model, []) for r in w.reports]
    if steps is not None:
        assert [m.steps for m in w.models] == steps
    return w


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(32, 8), torch.randint(0, 2, (32,))


def test_gradient_accumulation_counts_optimizer_steps_only():
    w = _clean("rw_grad_accum.py", "--epochs", "2", steps=[44])  # 89 micro-batches of 16 a epoch, 4 a step
    assert len(w.models[0].history) >= 44


@pytest.mark.parametrize("affine", ["frozen", "train"])
def test_batchnorm_kept_in_eval_on_purpose_is_not_bn307(affine):
    # before: with the affine parameters training (mmdetection's norm_eval=True), BN307 fired on all 11 steps
    w = _clean("rw_frozen_bn.py", "--affine", affine, "--steps", "12", steps=[12])
    assert w.models[0].live._checked_steps == 11


def test_a_whole_model_left_in_eval_still_is_bn307():
    model, opt, x, y = _tiny()
    with bnaudit.watch(select=["BN307"]) as w:
        for step in range(6):
            if step == 2:
                model.eval()  # a validation that never switches back
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    (f,) = w.reports[0].findings
    assert f.code == "BN307" and f.evidence["eval_steps"] == 4  # steps 2-5 trained in eval mode
    assert "call .eval() on them after model.train()" in f.fix


@pytest.mark.parametrize("how", [[], ["--inference"]])
def test_validation_each_epoch_on_two_loaders(how):
    # before: --inference crashed the script (the recorder read an inference tensor's version counter), and the
    # logits layer net.6 got BN206 (drifted 2.22 stds: a classifier learning)
    _clean("rw_validation.py", "--epochs", "3", *how, steps=[33])


@pytest.mark.parametrize("sched", ["onecycle", "cosine"])
def test_bfloat16_autocast_with_a_scheduler(sched):
    # before: BN206 on the logits layer net.6 with OneCycleLR (1.87 stds)
    _clean("rw_amp_sched.py", "--sched", sched, steps=[44])


def test_distillation_teacher_in_eval_under_no_grad():
    # before: BN206 on the student's logits layer net.6 (1.17 stds)
    w = _clean("rw_distill.py", steps=[22, 22])
    assert [m.name for m in w.models] == ["BNMLP", "BNMLP-2"]  # teacher (trained first), then student


def test_an_auxiliary_head_run_every_other_step():
    w = _clean("rw_aux_head.py", steps=[44])
    calls = w.models[0].history.series("aux.1", "calls")
    assert 0 < (calls[1:] > 0).mean() < 1  # its BatchNorm really was skipped on some steps


@pytest.mark.parametrize("steps", ["2", "5", "10"])
def test_a_short_run_gives_no_end_of_run_findings(steps):
    # before: BN206 on the logits layer "8" at every length (2.08, 2.1 and 1.72 stds)
    _clean("rw_short_run.py", "--steps", steps, steps=[int(steps)])


def test_output_layers_are_found_and_only_they_leave_bn206():
    w = _clean("rw_amp_sched.py", steps=[44])
    assert w.models[0].live.output_layers == {"net", "net.6"}
    model = sigmoid_mlp()  # inputs that shift as it trains: the hidden layers drift, and BN206 still says so
    with bnaudit.watch(select=["BN206"]) as w:
        train_on_shifting_inputs(model)
    assert w.models[0].live.output_layers == {"4"}
    layers = {f.layer for f in w.reports[0].findings}
    assert layers and "4" not in layers


@pytest.mark.parametrize("how", [[], ["--precise-bn"]])
def test_swa_and_precise_bn_recompute_statistics_on_purpose(how):
    # before: --precise-bn (update_bn on the trained model, a train-mode forward under no_grad) was a BN306 error
    _clean("rw_swa.py", *how, steps=[66])


def test_an_eval_loop_without_eval_is_still_bn306_beside_update_bn():
    model, opt, x, y = _tiny()
    with bnaudit.watch(select=["BN306"]) as w:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.optim.swa_utils.update_bn([x], model)  # on purpose: momentum None while it runs
        with torch.no_grad():
            model(x)  # the mistake: still in train mode
    (f,) = w.reports[0].findings
    assert f.code == "BN306" and f.step == 4


class _Net(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.tail = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3), tail

    def forward(self, x):
        h = self.bn(self.fc1(x))
        return self.tail(self, h)


@pytest.mark.parametrize(("tail", "outputs"), [
    (lambda m, h: nn.functional.log_softmax(m.fc2(torch.relu(h)), 1), {"fc2"}),  # the PyTorch MNIST example
    (lambda m, h: m.fc2(torch.relu(h)).squeeze(1) * 2.0, {"fc2"}),
    (lambda m, h: h, {"bn"}),  # ends in a BatchNorm: the walk stops at its parameters, fc1 is no output
    (lambda m, h: m.fc2(h) + h[:, :3], set()),  # two inputs: neither side is the output alone
])
def test_output_layers_through_parameter_free_operations(tail, outputs):
    torch.manual_seed(0)
    model = _Net(tail)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with bnaudit.watch(select=["BN206"]) as w:
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(32, 8)).square().mean().backward()
            opt.step()
    assert w.models[0].live.output_layers == outputs
