"""``bnaudit.watch()`` in this process on the real scripts of ``tests/scripts`` and on small loops: the models
it finds, the steps it counts, and the live findings at the user's own lines."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnaudit
from tests.watching.helpers import marked_line, watch_script


def _codes(report):
    return sorted(f.code for f in report.findings)


def test_correct_bn_mlp_gives_no_findings(capsys):
    w, outcome = watch_script("bn_mlp.py", "--epochs", "2")
    assert outcome.code == 0 and outcome.exc is None
    assert "val accuracy" in capsys.readouterr().out
    (report,) = w.reports
    assert report.model == "BNMLP"
    assert report.findings == ()
    assert report.meta["steps"] == 44  # 1437 training samples, batches of 64, drop_last: 22 a epoch
    h = w.models[0].history
    assert h.bn_layers == ["net.1", "net.4"] and "net.0" in h.layers
    assert list(h.steps[:3]) == [0, 1, 2]


def test_eval_loop_without_eval_is_bn306_at_the_evaluation_line():
    w, outcome = watch_script("eval_without_eval.py", "--epochs", "2")
    assert outcome.code == 0
    (report,) = w.reports
    (f,) = [f for f in report.findings if f.code == "BN306"]
    assert f.severity == "error"
    assert f.location.endswith(f"eval_without_eval.py:{marked_line('eval_without_eval.py', '# BN306')}")
    assert f.step == 22  # the first validation runs after the first epoch's 22 optimizer steps
    assert f.evidence["layers"] == ["net.1", "net.4"] and f.evidence["steps"] == 2


def test_validation_that_never_switches_back_is_bn307_at_the_optimizer_step():
    w, outcome = watch_script("left_in_eval.py", "--steps", "16", "--val-every", "8")
    assert outcome.code == 0
    (report,) = w.reports
    (f,) = [f for f in report.findings if f.code == "BN307"]
    assert f.location.endswith(f"left_in_eval.py:{marked_line('left_in_eval.py', '# BN307')}")
    assert f.step == 8  # validation after step 7 (the 8th); every step from the 9th on trains in eval mode
    assert f.evidence["eval_steps"] == 8 and f.evidence["layers"] == ["net.1", "net.4"]
    assert "BN306" not in _codes(report)  # its validation does call model.eval()


def test_gan_models_are_watched_separately_by_class():
    w, outcome = watch_script("gan.py", "--steps", "10")
    assert outcome.code == 0
    assert [m.name for m in w.models] == ["Discriminator", "Generator"]  # in the order of their first step
    assert [m.steps for m in w.models] == [10, 10]
    for m in w.models:
        assert len(m.history.bn_layers) == 1 and len(m.history) >= 10
    assert all(r.findings == () or "BN306" not in _codes(r) for r in w.reports)


def test_gan_fake_batch_under_no_grad_is_training_not_evaluation():
    # G runs in train mode under no_grad, then D steps: an optimizer step follows, so it is not an eval pass
    w, outcome = watch_script("gan.py", "--steps", "6", "--no-grad-fake")
    assert outcome.code == 0
    assert [m.steps for m in w.models] == [6, 6]
    assert all("BN306" not in _codes(r) for r in w.reports)


def test_a_no_grad_forward_with_no_optimizer_step_after_it_is_bn306():
    model, opt, x, y = _setup()
    with bnaudit.watch() as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            model(x)  # evaluation without model.eval(), and nothing trains after it
    (report,) = w.reports
    (f,) = [f for f in report.findings if f.code == "BN306"]
    assert f.step == 3 and f.evidence["calls"] == 2  # both BatchNorm layers, once


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                         nn.ReLU(), nn.Linear(16, 2))


def _setup():
    model = _mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.01), torch.randn(32, 8), torch.randint(0, 2, (32,))


def test_first_nonfinite_step_and_layer_are_bn209():
    model, opt, x, y = _setup()
    with bnaudit.watch() as w:
        for step in range(10):
            if step == 6:
                with torch.no_grad():
                    model[3].weight[0, 0] = float("inf")  # the second Linear breaks first
            loss = nn.functional.cross_entropy(model(x), y)  # BN209 call
            opt.zero_grad()
            loss.backward()
            opt.step()
    (f,) = [f for f in w.reports[0].findings if f.code == "BN209"]
    assert (f.step, f.layer) == (6, "3")
    source = Path(__file__).read_text().splitlines()
    line = next(i for i, t in enumerate(source, 1) if "# BN209 call" in t)
    assert f.location == f"{__file__}:{line}"


def test_short_last_batch_is_bn202_with_the_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(69, 8), torch.randint(0, 2, (69,)))  # batches of 32, 32 and 5
    with bnaudit.watch() as w:
        for _ in range(2):
            for x, y in DataLoader(data, batch_size=32):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    (f,) = [f for f in w.reports[0].findings if f.code == "BN202"]
    assert f.step == 2 and f.evidence["values_per_channel"] == 5 and f.evidence["steps"] == 2
    assert f.severity == "warning"


def test_select_and_ignore_limit_the_checks():
    w, _ = watch_script("eval_without_eval.py", "--epochs", "2", ignore=["BN306"])
    assert "BN306" not in _codes(w.reports[0])
    assert "BN306" not in w.reports[0].rules_run


def test_max_steps_stops_recording_and_the_script_runs_on():
    w, outcome = watch_script("bn_mlp.py", "--epochs", "1", max_steps=5)
    assert outcome.code == 0
    m = w.models[0]
    assert m.steps == 22 and len(m.history) == 5
    assert any("--max-steps" in n for n in w.reports[0].meta["notes"])


def test_watch_removes_every_hook():
    model, opt, x, y = _setup()
    with bnaudit.watch() as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    opt.step()  # the global optimizer hooks are gone too: nothing is counted
    assert w.models[0].steps == 3


def test_a_compiled_model_is_found_unwrapped_with_one_note():
    model, _, x, y = _setup()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    with bnaudit.watch() as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
    (m,) = w.models
    assert m.model is model and m.compiled and m.steps == 3
    (note,) = w.reports[0].meta["notes"]
    assert "torch.compile" in note and "not recorded" in note


def test_the_shipped_example_finds_its_one_mistake():
    from bnaudit import watching
    from tests.watching.helpers import ROOT

    script = ROOT / "examples" / "watch_train.py"
    with bnaudit.watch() as w:
        outcome = watching.run_program(str(script), ["--epochs", "3"])  # the README tour's command
    assert outcome.code == 0
    (report,) = w.reports
    assert [f.code for f in report.findings] == ["BN306"]
    line = next(i for i, t in enumerate(script.read_text().splitlines(), 1) if "model(x).argmax" in t)
    assert report.findings[0].location == f"{script}:{line}" and report.findings[0].step == 28


def test_every_and_layers_reach_the_recorder():
    model, opt, x, y = _setup()
    with bnaudit.watch(every=2, layers=["1", "4"]) as w:
        for _ in range(7):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    h = w.models[0].history
    assert list(h.steps) == [0, 2, 4, 6]
    assert h.layers == ["1", "4"] and h.bn_layers == ["1", "4"]


def test_layers_that_name_nothing_give_a_note_and_training_goes_on():
    model, opt, x, y = _setup()
    with bnaudit.watch(layers=["no.such.layer"]) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    (m,) = w.models
    assert m.steps == 3 and m.recorder is None and len(m.history) == 0
    assert any("not recorded" in n and "no.such.layer" in n for n in w.reports[0].meta["notes"])
