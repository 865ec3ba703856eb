"""train_compare on real data (sklearn digits) with small real models: fairness (same init, same batches),
reproducibility, divergence handling, the measurements, and the seeds' headline claim on a deep sigmoid MLP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bnaudit.errors import DataError, UsageError
from bnaudit.training import train_compare
from bnaudit.training.data import as_tensor_data, batch_order, split_validation
from bnaudit.training.losses import default_target, resolve_loss
from bnaudit.training.variants import base_model, build_variant, weight_layers
from tests.training.conftest import RUN_KEYS, load_example


def mlp_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


TINY = dict(lrs=[0.1], seeds=[0], steps=25, batch_sizes=[32], threads=1)


def test_same_seed_gives_identical_results(small_digits):
    a = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), **TINY)
    b = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), **TINY)
    assert [r.losses for r in a.runs] == [r.losses for r in b.runs]
    assert [r.val_losses for r in a.runs] == [r.val_losses for r in b.runs]
    assert [r.percentiles for r in a.runs] == [r.percentiles for r in b.runs]
    # measuring (recorder hooks, ICS on a shadow copy) never changes what is measured
    d = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), record=False, ics_layer="3", **TINY)
    assert [r.losses for r in a.runs] == [r.losses for r in d.runs]
    c = train_compare(mlp_dropout, small_digits, variants=("baseline",), **{**TINY, "seeds": [1]})
    assert c.runs[0].losses != a.runs[0].losses  # another seed: another init and batch order


def test_variants_share_initial_weights(small_digits):
    x, _ = small_digits
    base, _ = base_model(mlp_dropout, seed=3, reinit=True)
    models = {
        v: build_variant(v, base, example=x[:8], seed=3, reinit=True)[0]
        for v in ("baseline", "bn", "groupnorm", "layernorm")
    }
    ref = [m.weight for _, m in weight_layers(models["baseline"])]
    assert len(ref) == 3
    for v, model in models.items():
        weights = [m.weight for _, m in weight_layers(model)]
        assert len(weights) == 3, v
        for w0, w in zip(ref, weights):
            assert torch.equal(w0, w), v
        assert model is not base
    assert any(isinstance(m, nn.BatchNorm1d) for m in models["bn"].modules())
    assert any(isinstance(m, nn.GroupNorm) for m in models["groupnorm"].modules())
    # a different seed draws different weights
    other, _ = base_model(mlp_dropout, seed=4, reinit=True)
    assert not torch.equal(weight_layers(other)[0][1].weight, ref[0])


def test_twin_variant_sees_identical_init_batches_and_dropout(small_digits):
    # "user" is the same architecture: if init, batch order and dropout masks are identical, so is every loss.
    result = train_compare(
        mlp_dropout, small_digits, variants=("baseline", "user"), user_model=mlp_dropout, **{**TINY, "seeds": [0, 1]}
    )
    for seed in (0, 1):
        base = result.runs_of("baseline")[seed]
        twin = result.runs_of("user")[seed]
        assert base.seed == twin.seed == seed
        assert base.losses == twin.losses
        assert len(base.losses) == 25


def test_module_input_is_reinitialised_per_seed_and_left_untouched(small_digits):
    model = mlp_dropout()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = train_compare(model, small_digits, variants=("baseline",), **{**TINY, "seeds": [0, 1]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert result.runs[0].losses[0] != result.runs[1].losses[0]
    kept = train_compare(model, small_digits, variants=("baseline",), reinit=False, **{**TINY, "seeds": [0, 1]})
    # without re-initialisation both seeds start from the given weights: same first-batch-independent val loss
    assert kept.runs[0].val_losses[0] == kept.runs[1].val_losses[0]


def test_divergence_is_reported_not_raised(small_digits):
    x, y = small_digits
    target = y.float().unsqueeze(1)  # float targets: loss auto -> MSE
    result = train_compare(
        lambda: nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1)),
        (x, target),
        variants=("baseline",),
        lrs=[50.0],
        seeds=[0, 1],
        steps=40,
        threads=1,
    )
    assert result.settings["loss"] == "mse"
    for run in result.runs:
        assert run.diverged is True
        assert run.diverged_at is not None and run.diverged_at <= 40
        assert run.final_loss is None and run.val_loss is None
        assert run.divergence
    assert result.cells[0].diverged == 2
    assert any("diverged in 2/2 seeds" in line for line in result.verdict)
    data = json.loads(result.to_json())  # strict JSON: no NaN/Infinity anywhere
    assert data["runs"][0]["diverged"] is True


def test_deep_sigmoid_bn_reaches_target_sooner_at_high_lr(digits):
    example = load_example("deep_sigmoid_digits")
    steps = 200
    result = train_compare(
        example.build_model,
        digits,
        variants=("baseline", "bn"),
        lrs=[2.0],
        seeds=[0, 1, 2],
        steps=steps,
        record=False,
        threads=1,
    )
    bn = result.runs_of("bn")
    base = result.runs_of("baseline")
    assert len(bn) == len(base) == 3
    # Every BN seed reaches the target; count a baseline that never does as steps + 1.
    assert all(r.steps_to_target is not None for r in bn), [r.steps_to_target for r in bn]
    bn_steps = [r.steps_to_target for r in bn]
    base_steps = [r.steps_to_target if r.steps_to_target is not None else steps + 1 for r in base]
    for s_bn, s_base in zip(bn_steps, base_steps):  # per seed, with a 2x margin
        assert s_bn * 2 <= s_base, (bn_steps, base_steps)
    assert all(not r.diverged for r in bn)
    cell = result.cell("bn", 2.0, 64)
    assert cell is not None and cell.reached == 3
    assert any(line.startswith("At lr 2: with bn, reached loss") for line in result.verdict)


def test_json_has_the_documented_keys(small_digits):
    result = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), **TINY)
    data = json.loads(result.to_json())
    assert data["kind"] == "train-compare" and data["schema_version"] == 1
    for key in ("variants", "lrs", "batch_sizes", "seeds", "steps", "optimizer", "loss", "target_loss"):
        assert key in data["settings"]
    run = data["runs"][0]
    assert set(run) >= RUN_KEYS
    assert len(run["losses"]) == 25
    # accuracy is a count of correct validation examples over their number, the last point of its curve,
    # and after 25 steps on digits well above the 1-in-10 of guessing
    n_val = data["settings"]["val_examples"]
    for r in data["runs"]:
        assert n_val == 80 and abs(r["val_accuracy"] * n_val - round(r["val_accuracy"] * n_val)) < 1e-9
        assert r["val_accuracy"] == r["val_curve"]["accuracy"][-1]
        assert r["val_accuracy"] > 0.2, (r["variant"], r["val_accuracy"])
    assert data["summary"][0]["steps_to_target"].keys() == {"mean", "std", "n"}


def test_measurements_per_run(small_digits):
    result = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), ics_layer="3", log_every=5, **TINY)
    for run in result.runs:
        layers = run.grad_norms["layers"]
        assert len(layers) >= 3 and all(len(v) == len(run.grad_norms["steps"]) for v in layers.values())
        assert all(v > 0 for vals in layers.values() for v in vals)
        assert run.percentiles is not None and run.percentiles["layer"] is not None
        p = run.percentiles
        assert all(a <= b <= c for a, b, c in zip(p["p15"], p["p50"], p["p85"]))
        assert run.drift is not None and run.drift["layers"]
        assert all(vals[0] == 0.0 for vals in run.drift["layers"].values())  # drift is measured from step 1
        assert run.ics is not None and "Santurkar" in run.ics["view"]
        # layer 3's predecessors took their step, so its gradient on the same batch moved (G' != G)
        assert run.ics["steps"] and all(v > 0 for v in run.ics["l2"]) and all(c < 1 - 1e-5 for c in run.ics["cosine"])
    bn = result.runs_of("bn")[0]
    assert bn.ics["layer"] != "3"  # insert_bn wrapped the Linear; the same layer is followed under its new name
    # The first layer has no predecessors: nothing moves before G' is taken, so G' == G exactly.
    first = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), ics_layer="0", log_every=5, **TINY)
    for run in first.runs:
        assert run.ics["steps"] and run.ics["l2"] == [0.0] * len(run.ics["steps"])
        assert all(c == pytest.approx(1.0, abs=1e-6) for c in run.ics["cosine"])


def test_loss_auto_target_and_split(small_digits):
    x, y = small_digits
    assert resolve_loss("auto", y)[0] == "cross_entropy"
    assert resolve_loss("auto", y.float())[0] == "mse"
    with pytest.raises(DataError, match="integer class targets"):
        resolve_loss("cross_entropy", y.float())
    with pytest.raises(UsageError, match="unknown loss"):
        resolve_loss("hinge", y)
    p = torch.bincount(y).double() / len(y)
    assert default_target("cross_entropy", y) == pytest.approx(float(-(p * p.log()).sum()) / 4, abs=1e-4)
    data = as_tensor_data((x, y))
    train, val = split_validation(data, 0.2, seed=0)
    assert len(val) == 80 and len(train) == 320
    again = split_validation(data, 0.2, seed=0)[1]
    assert torch.equal(val.inputs, again.inputs)
    result = train_compare(mlp_dropout, (x, y), val_data=(x[:50], y[:50]), variants=("baseline",), **TINY)
    assert result.settings["val_examples"] == 50 and result.settings["train_examples"] == 400


def test_batch_order_is_a_function_of_seed_and_batch_size():
    a = [t.tolist() for t in batch_order(10, 3, 7, seed=5)]
    b = [t.tolist() for t in batch_order(10, 3, 7, seed=5)]
    assert a == b and len(a) == 7 and all(len(t) == 3 for t in a)
    assert sorted(i for t in a[:3] for i in t) == sorted(set(i for t in a[:3] for i in t))  # no repeats in an epoch


def test_data_forms_agree(small_digits):
    from torch.utils.data import DataLoader, TensorDataset

    from bnaudit.loading import load_data

    x, y = small_digits
    ds = TensorDataset(x, y)
    forms = [
        (x, y),
        (x.numpy(), y.numpy()),
        ds,
        DataLoader(ds, batch_size=64),
        load_data(DataLoader(ds, batch_size=50)),
    ]
    for form in forms:
        data = as_tensor_data(form)
        assert torch.equal(data.inputs, x) and torch.equal(data.targets, y), type(form)
    with pytest.raises(DataError, match="needs targets"):
        as_tensor_data(load_data(x))


def test_bad_options_raise_typed_errors(small_digits):
    with pytest.raises(UsageError, match="unknown variant"):
        train_compare(mlp_dropout, small_digits, variants=("baseline", "batchnorm"), **TINY)
    with pytest.raises(UsageError, match="user_model"):
        train_compare(mlp_dropout, small_digits, variants=("user",), **TINY)
    with pytest.raises(UsageError, match="optimizer"):
        train_compare(mlp_dropout, small_digits, optimizer="lbfgs", **TINY)
    with pytest.raises(DataError, match="cannot take the training inputs"):
        train_compare(lambda: nn.Linear(10, 2), small_digits, variants=("baseline",), **TINY)
    with pytest.raises(DataError, match="larger than"):
        train_compare(mlp_dropout, small_digits, **{**TINY, "batch_sizes": [5000]})


def test_parallel_workers_match_sequential(small_digits):
    seq = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), record=False, **TINY)
    par = train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), record=False, workers=2, **TINY)
    assert [r.losses for r in seq.runs] == [r.losses for r in par.runs]


def test_progress_events(small_digits):
    events = []
    train_compare(mlp_dropout, small_digits, variants=("baseline", "bn"), progress=events.append, **TINY)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and events[0].total_runs == 2
    assert kinds.count("run") == 2 and kinds.count("done") == 2
    done = [e for e in events if e.kind == "done"]
    assert all(e.result is not None and e.result.seconds > 0 for e in done)
    assert math.isclose(events[0].total_steps, 50)
