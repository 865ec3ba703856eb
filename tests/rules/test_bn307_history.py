"""BN307 over a recorded history (``bnaudit.record`` + ``inspect(history=...)``): BatchNorm held in eval mode
inside a model in train mode is deliberate (mmdetection's ``norm_eval`` with trainable affine parameters,
statistics frozen while fine-tuning) and not reported; a validation pass that leaves the whole model in eval
mode still is. The model's own training flag is recorded per step for this."""

from __future__ import annotations

import torch
from torch import nn

import bnaudit
from bnaudit.probes.eval_steps import eval_mode_steps
from bnaudit.recording import History
from bnaudit.rules.examples import digits


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def _norm_eval(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()


def _run(model: nn.Module, before_step, steps: int = 8) -> History:
    x, y = digits(256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bnaudit.record(model) as rec:
        for step in range(steps):
            before_step(model, step)
            i = slice(32 * (step % 8), 32 * (step % 8) + 32)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            rec.step()
    return rec.history


def _bn307(model: nn.Module, history: History):
    report = bnaudit.inspect(model, select=["BN307"], history=history)
    assert "BN307" in report.rules_run
    return list(report.findings)


def test_norm_eval_with_trainable_affine_is_not_reported():
    model = _mlp()
    history = _run(model, lambda m, _: _norm_eval(m))
    assert history.model_training == [True] * 8
    assert not history.bn_modes("1").training.any() and history.bn_modes("1").requires_grad.all()
    assert _bn307(model, history) == []


def test_a_validation_that_leaves_the_whole_model_in_eval_is_still_reported():
    model = _mlp()
    history = _run(model, lambda m, step: m.eval() if step == 3 else None)  # no model.train() afterwards
    assert history.model_training == [True] * 3 + [False] * 5
    (f,) = _bn307(model, history)
    # steps 3-7 ran in eval mode (step 3's forward already did: its counter did not advance)
    assert f.layer == "1" and f.evidence["eval_steps"] == 5 and f.evidence["first_step"] == history.steps[3]


def test_the_flag_survives_save_and_load_and_an_older_file_reads_as_unknown(tmp_path):
    model = _mlp()
    history = _run(model, lambda m, _: _norm_eval(m))
    loaded = History.load(history.save(tmp_path / "h.pt"))
    assert loaded.model_training == [True] * 8 and _bn307(model, loaded) == []
    payload = history.to_payload()
    del payload["model_training"]  # as saved before the flag was recorded: the old verdict
    older = History.from_payload(payload)
    assert older.model_training == [None] * 8
    (f,) = _bn307(model, older)
    assert f.evidence["eval_steps"] == 7  # every step but the first, which has no earlier counter to compare


def test_eval_mode_steps_skips_only_the_steps_in_which_the_model_trained():
    steps, flags, grads, counts = range(4), {"bn": [False] * 4}, {"bn": [True] * 4}, {"bn": [5, 5, 5, 5]}
    assert eval_mode_steps(steps, flags, grads, counts)[0].steps == (1, 2, 3)
    (span,) = eval_mode_steps(steps, flags, grads, counts, model_training=[True, True, False, None])
    assert span.steps == (2, 3)
    assert eval_mode_steps(steps, flags, grads, counts, model_training=[True] * 4) == []
