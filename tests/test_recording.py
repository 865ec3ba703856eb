"""bnaudit.record: recorded statistics equal a direct computation on stored activations (NC, NCL, NCHW, both
the grouped path for small tensors and the in-hook path for large ones), hooks are gone and the model is
bit-identical afterwards (exceptions included), BatchNorm mode series, exports, and torch.compile."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnaudit
from bnaudit.errors import OutputError, UsageError
from bnaudit.recording import History, RecordingError, record


def _capture(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Store every leaf module's output (and BN inputs) at the moment it is produced."""
    acts: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if not name or list(m.children()):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, n=name: acts.setdefault(n, []).append(args[0].detach().clone())))
        else:
            handles.append(m.register_forward_hook(
                lambda mod, args, out, n=name: acts.setdefault(n, []).append(out.detach().clone())))
    return acts, handles


def _train(model: nn.Module, batches, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with record(model, **kw) as rec:
        for x in batches:
            out = model(x)
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    return rec.history


def _train_captured(model: nn.Module, batches, **kw):
    """``_train`` with every leaf's output captured as it was produced: (history, captured activations)."""
    acts, handles = _capture(model)
    try:
        return _train(model, batches, **kw), acts
    finally:
        for hd in handles:
            hd.remove()


def _mlp_5_7_13_3() -> nn.Module:
    """Held tensors of widths 7, 7, 13, 13 and 3 (a batch of 16: 112, 112, 208, 208 and 48 values)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 13), nn.Sigmoid(), nn.Linear(13, 3))


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()})


def _assert_same(model: nn.Module, snap) -> None:
    state, flags = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]) or (state[k].isnan() == now[k].isnan()).all(), k
    assert flags == {n: m.training for n, m in model.named_modules()}


def _no_hooks(model: nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))).mean(2))


MODELS = {
    "NC": (lambda: nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh()), (16, 5)),
    "NCL": (Conv1dNet, (8, 3, 10)),
    "NCHW": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)),
             (4, 3, 8, 8)),
}


@pytest.mark.parametrize("layout", list(MODELS))
@pytest.mark.parametrize("scale", [1, 1024], ids=["grouped", "in-hook"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "whole"])
def test_recorded_stats_equal_direct_computation(layout, scale, per_channel):
    # Whole-tensor rows (per_channel=False) are reduced per channel and collapsed on the host: the same
    # whole-tensor statistics, one channel per layer.
    factory, shape = MODELS[layout]
    torch.manual_seed(0)
    model = factory()
    shape = (shape[0] * scale, *shape[1:])
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(*shape, generator=g) * 2 + 1 for _ in range(3)]
    h, acts = _train_captured(model, batches, per_channel=per_channel)
    assert len(h) == 3 and list(h.steps) == [0, 1, 2]
    for name in h.layers:
        ref = acts[name]
        x0 = ref[0]
        cd = -1 if isinstance(dict(model.named_modules())[name], nn.Linear) and x0.dim() > 2 else 1
        dims = tuple(d for d in range(x0.dim()) if d != cd % x0.dim())
        if per_channel:
            cm = np.stack([r.double().mean(dims).numpy() for r in ref])
            cv = np.stack([r.double().var(dims, unbiased=False).numpy() for r in ref])
        else:
            cm = np.array([[r.double().mean()] for r in ref])
            cv = np.array([[r.double().var(unbiased=False)] for r in ref])
            cd = None
        np.testing.assert_allclose(h.series(name, "channel_mean"), cm, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(h.series(name, "channel_var"), cv, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(h.series(name, "mean"), [r.double().mean() for r in ref], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h.series(name, "var"), [r.double().var(unbiased=False) for r in ref], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(h.series(name, "min"), [r.min() for r in ref], rtol=1e-6)
        np.testing.assert_allclose(h.series(name, "max"), [r.max() for r in ref], rtol=1e-6)
        np.testing.assert_allclose(h.series(name, "zero_frac"), [(r == 0).double().mean() for r in ref], atol=1e-7)
        assert (h.series(name, "nonfinite_frac") == 0).all()
        assert (h.series(name, "count") == x0.numel() // (x0.shape[cd] if cd is not None else 1)).all()
        assert per_channel or h.info[name]["channel_dim"] is None
    _no_hooks(model)


def test_model_unchanged_and_hooks_removed_after_exception():
    torch.manual_seed(0)
    model = MODELS["NCHW"][0]()
    model.train()
    model[1].eval()  # a mixed mode to preserve
    snap = _snapshot(model)
    with pytest.raises(ZeroDivisionError), torch.no_grad(), record(model, units={"0": [0]}) as rec:
        model(torch.randn(4, 3, 8, 8))
        # a tensor held for step() is released, hooks removed, even here
        raise ZeroDivisionError
    _no_hooks(model)
    # the forward above ran BN in eval mode: nothing moved; recording itself only read
    _assert_same(model, snap)
    assert all(s.stash is None and s.acc is None for s in rec._slots)


def test_record_only_reads_the_model():
    torch.manual_seed(0)
    model = MODELS["NC"][0]()
    twin = __import__("copy").deepcopy(model)
    x = torch.randn(16, 5)
    with torch.no_grad():
        with record(model) as rec:
            out = model(x)
            rec.step()
        ref = twin(x)
    assert torch.equal(out, ref)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    _no_hooks(model)


def test_step_never_called_merges_the_block_into_one_row():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    xs = [torch.randn(10, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad(), record(model) as rec:
        outs = [model(x) for x in xs]
    h = rec.history
    assert len(h) == 1
    assert h.series("0", "calls")[0] == 3 and h.series("0", "count")[0] == 30
    full = torch.cat(outs).double()
    np.testing.assert_allclose(h.series("1", "channel_mean")[0], full.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.series("1", "channel_var")[0], full.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(h.series("1", "zero_frac")[0], (full == 0).double().mean(), atol=1e-7)


def test_every_and_scalar_mode():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    xs = [torch.randn(10, 4) for _ in range(6)]
    h = _train(model, xs, every=2, per_channel=False)
    assert list(h.steps) == [0, 2, 4]
    assert h.series("0", "channel_mean").shape == (3, 1)
    assert h.bytes_per_step < 200


def test_whole_tensor_variance_stays_exact_far_from_zero():
    # Whole-tensor rows merge per-channel moments on the host (Chan's update in float64): channels whose means
    # differ by thousands of standard deviations still give the whole tensor's variance, where
    # E[x^2] - E[x]^2 in float32 would keep no digit of it.
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1e4, 1e4 + 1.0, -2e4, 5.0]))
        lin.weight[:, 0] = torch.tensor([1.0, 0.5, 2.0, 0.25])
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(64, 3, generator=g) for _ in range(3)]
    model = nn.Sequential(lin)
    outs = []
    with torch.no_grad(), record(model, per_channel=False) as rec:
        for x in xs:
            outs.append(model(x).double())
            rec.step()
    h = rec.history
    assert h.layers == ["0"]
    np.testing.assert_allclose(h.series("0", "var"), [o.var(unbiased=False) for o in outs], rtol=1e-6)
    # the mean of channels at +-1e4 is a cancellation: good to float32's resolution there (1e-3), no better
    np.testing.assert_allclose(h.series("0", "mean"), [o.mean() for o in outs], atol=2e-3)


def test_inplace_ops_are_measured_before_they_overwrite():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return F.relu_(self.fc(x))  # functional in-place: no hook sees it

    m1 = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    with torch.no_grad():
        pre = m1[0](x).double()
        with record(m1) as rec:
            for _ in range(3):  # the later steps take the hooks' fast path
                m1(x)
                rec.step()
    np.testing.assert_allclose(rec.history.series("0", "mean"), [pre.mean()] * 3, rtol=1e-5)
    assert (rec.history.series("0", "min") < 0).all()  # the pre-ReLU values, not the overwritten ones
    np.testing.assert_allclose(rec.history.series("1", "min"), [0.0] * 3)

    m2 = Functional()
    with torch.no_grad(), record(m2) as rec2:
        for _ in range(2):
            m2(x)
            rec2.step()
    h = rec2.history
    assert np.isnan(h.series("fc", "mean")[0]) and h.series("fc", "calls")[0] == 0
    np.testing.assert_allclose(h.series("fc", "min")[1], float(m2.fc(x).detach().min()), rtol=1e-6)
    assert any("changed in place" in n for n in h.notes)


def test_bn_mode_series_for_bn307():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record(model) as rec:
        for step in range(6):
            if step == 2:
                model[1].eval()  # the mistake BN307 catches: trainable BN in eval mode while training
            if step == 4:
                model[1].train()
                model[1].weight.requires_grad_(False)
                model[1].bias.requires_grad_(False)
            model(torch.randn(16, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    modes = rec.history.bn_modes("1")
    assert rec.history.bn_layers == ["1"]
    assert modes.training.tolist() == [True, True, False, False, True, True]
    assert modes.num_batches_tracked.tolist() == [1, 2, 2, 2, 3, 4]
    assert modes.requires_grad.tolist() == [True, True, True, True, False, False]
    assert modes.updated.all()
    np.testing.assert_allclose(rec.history.series("1", "running_mean")[-1], model[1].running_mean.numpy(), rtol=1e-6)
    with pytest.raises(UsageError):
        rec.history.bn_modes("0")


def test_shared_module_called_twice_per_step_is_merged():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    m = Twice()
    x = torch.randn(8, 4)
    with torch.no_grad():
        a = m.fc(x)
        b = m.fc(a)
        with record(m) as rec:
            m(x)
            rec.step()
    both = torch.cat([a, b]).double()
    h = rec.history
    assert h.series("fc", "calls")[0] == 2
    np.testing.assert_allclose(h.series("fc", "channel_mean")[0], both.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.series("fc", "channel_var")[0], both.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def test_units_quantiles_and_nonfinite():
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid())
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(model, units={"0": [1, 4]}, quantiles=(0.15, 0.5, 0.85)) as rec:
        ref = model[0](x)
        model(x)
        rec.step()
        bad = x.clone()
        bad[0, 0] = float("nan")
        model(bad)
        rec.step()
    h = rec.history
    q = h.series("0", "quantiles")
    assert q.shape == (2, 3, 2)
    expect = torch.quantile(ref[:, [1, 4]], torch.tensor([0.15, 0.5, 0.85]), dim=0).numpy()
    np.testing.assert_allclose(q[0], expect, rtol=1e-5)
    nf = h.series("0", "nonfinite_frac")
    assert nf[0] == 0 and nf[1] == pytest.approx(5 / (64 * 5))  # one NaN input poisons one row of 5 outputs


def test_exports_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MODELS["NC"][0]()
    h = _train(model, [torch.randn(16, 5) for _ in range(3)], units={"3": 0})
    h.save(tmp_path / "h.pt")
    back = History.load(tmp_path / "h.pt")
    assert back.layers == h.layers and back.bn_layers == h.bn_layers
    for name in h.layers:
        for stat in ("channel_mean", "var", "zero_frac", "calls"):
            np.testing.assert_array_equal(back.series(name, stat), h.series(name, stat))
    np.testing.assert_array_equal(back.series("3", "quantiles"), h.series("3", "quantiles"))
    assert back.bn_modes("1").num_batches_tracked.tolist() == [1, 2, 3]
    h.to_json(tmp_path / "h.json")
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["schema"] == "bnaudit.history/1" and data["steps"] == [0, 1, 2]
    assert len(data["layers"]["0"]["channel_mean"]) == 3 and data["batchnorm"]["1"]["training"] == [True] * 3
    h.to_csv(tmp_path / "h.csv")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith("step,layer,calls,count,mean,var")
    assert len(lines) == 1 + 3 * len(h.layers) + 3
    with pytest.raises(OutputError):
        h.to_csv(tmp_path / "h.csv")
    h.to_csv(tmp_path / "h.csv", force=True)
    with pytest.raises(UsageError):
        History.load(tmp_path / "h.csv")


def test_memory_grows_by_documented_bytes():
    model = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad(), record(model, chunk=64) as rec:
        for _ in range(100):
            model(torch.randn(8, 4))
            rec.step()
    h = rec.history
    # 3 layers (Linear 32, BN input 32, ReLU 32, Linear 2) -> 4 x (2C + 4) each, BN buffers 4 x (2C + 1)
    width = (2 * 32 + 4) * 3 + (2 * 2 + 4) + (2 * 32 + 1)
    assert h.bytes_per_step == 4 * width + 16 * 4 + 2 * 1 + 9
    assert h.nbytes <= 100 * h.bytes_per_step + 64 * h.bytes_per_step  # at most one chunk ahead


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RecordingError, match="names no module"):
        record(model, layers=["nope"])
    with pytest.raises(UsageError):
        record(model, every=0)
    with pytest.raises(RecordingError):
        record(model, units={"missing": 0})
    rec = record(model)
    with pytest.raises(UsageError):
        rec.step()
    assert bnaudit.record is record


def test_torch_compile_never_silently_records_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    compiled(x).sum().backward()  # first compiled call: hooks added after it may never fire
    opt.step()
    opt.zero_grad()
    try:
        with record(model) as rec:
            for _ in range(2):
                compiled(x).sum().backward()
                opt.step()
                opt.zero_grad()
                rec.step()
    except RecordingError as exc:
        assert "torch.compile" in str(exc)
    else:  # dynamo recompiled with the hooks: then the numbers must be real
        assert len(rec.history) == 2 and rec.history.series("0", "calls").min() >= 1
    _no_hooks(model)
    torch._dynamo.reset()


def test_torch_compile_recorded_when_entered_before_the_first_call():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(16, 4)
    with torch.no_grad():
        ref = model[0](x).double()
        with record(compiled) as rec:  # the wrapper is unwrapped: names are the model's own
            for _ in range(2):
                compiled(x)
                rec.step()
    h = rec.history
    assert h.layers[:1] == ["0"] and h.series("0", "calls").tolist() == [1.0, 1.0]
    np.testing.assert_allclose(h.series("0", "mean"), [ref.mean()] * 2, rtol=1e-5)
    _no_hooks(model)
    torch._dynamo.reset()


def _assert_nc_rows_match(h, acts: dict[str, list[torch.Tensor]]) -> None:
    """Every recorded (N, C) layer's rows equal a direct float64 computation on its captured outputs."""
    for name in h.layers:
        ref = acts[name]
        np.testing.assert_allclose(h.series(name, "channel_mean"), np.stack([r.double().mean(0) for r in ref]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(h.series(name, "channel_var"),
                                   np.stack([r.double().var(0, unbiased=False) for r in ref]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(h.series(name, "min"), [r.min() for r in ref], rtol=1e-6)
        np.testing.assert_allclose(h.series(name, "max"), [r.max() for r in ref], rtol=1e-6)
        np.testing.assert_allclose(h.series(name, "zero_frac"), [(r == 0).double().mean() for r in ref], atol=1e-7)


def test_hold_budget_and_mixed_widths_keep_exact_stats(monkeypatch):
    # Widths 7, 7, 13, 13, 3 share one held group until the per-step budget runs out; the rest are reduced in
    # their hooks. Either way each layer's row equals a direct computation.
    import bnaudit.recording as recording

    monkeypatch.setattr(recording, "_HOLD_MAX", 16 * 7 + 16 * 7 + 16 * 13)
    g = torch.Generator().manual_seed(4)
    h, acts = _train_captured(_mlp_5_7_13_3(), [torch.randn(16, 5, generator=g) for _ in range(3)])
    _assert_nc_rows_match(h, acts)


def test_held_groups_split_into_runs_keep_exact_stats(monkeypatch):
    # With a small run size the held tensors (16 x 7, 16 x 7, 16 x 13, 16 x 13, 16 x 3) are reduced in several
    # runs of one structure, step after step; every layer's row still equals a direct computation.
    from bnaudit import recording

    monkeypatch.setattr(recording, "_RUN_MAX", 16 * 16)
    g = torch.Generator().manual_seed(5)
    h, acts = _train_captured(_mlp_5_7_13_3(), [torch.randn(16, 5, generator=g) for _ in range(4)])
    assert len(h) == 4
    _assert_nc_rows_match(h, acts)


def test_reduce_outside_a_process_group_changes_nothing():
    torch.manual_seed(0)
    model = MODELS["NC"][0]()
    xs = [torch.randn(16, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hs = []
    for reduce in (False, True):
        with torch.no_grad(), record(model, reduce=reduce) as rec:
            for x in xs:
                model(x)
                rec.step()
        assert rec._reduce is False
        hs.append(rec.history)
    for name in hs[0].layers:
        np.testing.assert_array_equal(hs[0].series(name, "channel_var"), hs[1].series(name, "channel_var"))


def _async(monkeypatch, on: bool) -> None:
    # Whether held tensors go to the recorder's thread: forced, whatever this machine's cores and threads.
    from bnaudit import recording

    monkeypatch.setattr(recording, "_spare_core", lambda: on)
    monkeypatch.setattr(recording, "_ASYNC_MIN", 0)
    monkeypatch.setattr(recording, "_RUN_MAX", 2000)  # several runs per step there, as on a large model


def _mlp_run(steps: int = 5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(),
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(6)
    return model, [torch.randn(24, 20, generator=g) * 3 + 1 for _ in range(steps)]


def test_recorders_thread_writes_what_inline_reduction_writes(monkeypatch):
    # The same training recorded with the held tensors reduced on the recorder's thread and inline: every
    # statistic of every step agrees, and every row equals a direct computation.
    _async(monkeypatch, True)
    model, batches = _mlp_run()
    acts, handles = _capture(model)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with record(model) as rec:
        for x in batches:
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
            seen.append(rec._worker is not None)
            # readable mid-recording: the rows of every step so far are there
            assert len(rec.history.series("0", "mean")) == len(seen)
    threaded = rec.history
    for hd in handles:
        hd.remove()
    assert all(seen)
    assert not [t for t in threading.enumerate() if t.name == "bnaudit-record"]
    _async(monkeypatch, False)
    model, batches = _mlp_run()
    inline = _train(model, batches)
    assert threaded.layers == inline.layers
    for name in inline.layers:
        for stat in ("channel_mean", "channel_var", "min", "max", "zero_frac", "nonfinite_frac", "count", "calls"):
            np.testing.assert_allclose(threaded.series(name, stat), inline.series(name, stat), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} {stat}")
    np.testing.assert_array_equal(threaded.series("3", "running_mean"), inline.series("3", "running_mean"))
    for name in ("0", "1", "5"):
        np.testing.assert_allclose(threaded.series(name, "channel_mean"),
                                   np.stack([r.double().mean(0) for r in acts[name]]), rtol=1e-5, atol=1e-6)


def test_error_on_the_recorders_thread_reaches_the_caller(monkeypatch):
    from bnaudit import recording

    _async(monkeypatch, True)
    calls = []
    real = recording.group_stats

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("reduction failed on purpose")
        return real(*args, **kwargs)

    monkeypatch.setattr(recording, "group_stats", failing)
    model, batches = _mlp_run(4)
    with pytest.raises(RuntimeError, match="on purpose"):
        _train(model, batches)
    _no_hooks(model)
    assert not [t for t in threading.enumerate() if t.name == "bnaudit-record"]


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "recorders-thread"])
def test_small_steps_reduced_in_batches_stay_exact_and_catch_late_inplace_changes(monkeypatch, threaded):
    # Small steps wait to be reduced together (inline, or on the recorder's thread when it has a core of its
    # own); reads, a change of structure and the end of the block reduce what waits. A held tensor changed in
    # place after its step() (here: the model's output) is dropped for that step.
    from bnaudit import recording

    monkeypatch.setattr(recording, "_spare_core", lambda: threaded)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(16, 6, generator=g) for _ in range(5)] + [torch.randn(10, 6, generator=g)]
    acts, handles = _capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with record(model) as rec:
        for i, x in enumerate(batches):
            out = model(x)
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
            if i == 1:
                out.detach().add_(1.0)  # after step(), before its batch is reduced
            if i == 3:
                assert len(rec._batch) == 4
                assert len(rec.history.series("0", "mean")) == 4 and not rec._batch  # a read reduces what waits
                assert (rec._worker is not None) == threaded
            elif i < 3:
                assert len(rec._batch) == i + 1  # waiting, not yet reduced
    for hd in handles:
        hd.remove()
    h = rec.history
    assert h.series("2", "calls").tolist() == [1, 0, 1, 1, 1, 1]
    assert any("step 1: 2's tensor was changed in place" in n for n in h.notes)
    for name in h.layers:
        ref = acts[name]
        keep = [i for i in range(6) if not (name == "2" and i == 1)]
        got = h.series(name, "channel_mean")[keep]
        np.testing.assert_allclose(got, np.stack([ref[i].double().mean(0) for i in keep]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h.series(name, "channel_var")[keep],
                                   np.stack([ref[i].double().var(0, unbiased=False) for i in keep]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(h.series(name, "max")[keep], [ref[i].max() for i in keep], rtol=1e-6)
        np.testing.assert_allclose(h.series(name, "zero_frac")[keep], [(ref[i] == 0).double().mean() for i in keep],
                                   atol=1e-7)


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "recorders-thread"])
def test_failed_batch_reads_back_as_not_called(monkeypatch, threaded):
    # A batch whose reduction fails leaves rows that read as "not called" (NaN), never uninitialised memory.
    from bnaudit import recording

    monkeypatch.setattr(recording, "_spare_core", lambda: threaded)
    monkeypatch.setattr(recording, "group_stats", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    model, batches = _mlp_run(3)
    rec = record(model)
    with pytest.raises(RuntimeError, match="boom"), rec:
        for x in batches:
            model(x).pow(2).mean().backward()
            rec.step()
    h = rec.history
    assert len(h) == 3
    for name in h.layers:
        assert (h.series(name, "calls") == 0).all(), name
        assert np.isnan(h.series(name, "mean")).all(), name
    _no_hooks(model)


class Branchy(nn.Module):
    """A model whose structure changes between steps: a shared activation called twice, a skipped layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.extra, self.head = (nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8),
                                                               nn.Linear(8, 8), nn.Linear(8, 3))

    def forward(self, x, twice=False, skip=False):
        h = self.act(self.fc1(x))
        if twice:
            h = self.act(self.fc2(h))
        if not skip:
            h = self.extra(h)
        return self.head(h)


def test_hooks_fast_path_follows_every_change_of_structure(monkeypatch):
    # Once steps repeat one structure, hooks hold tensors as the step before did without re-deciding how; a
    # step of another batch size, a layer called twice or a layer skipped must each be recorded exactly.
    from bnaudit import recording

    monkeypatch.setattr(recording, "_spare_core", lambda: False)
    torch.manual_seed(0)
    model = Branchy()
    g = torch.Generator().manual_seed(9)
    plan = [(16, {}), (16, {}), (16, {}), (10, {}), (16, {}), (16, {"twice": True}), (16, {}), (16, {"skip": True}),
            (16, {}), (16, {})]
    acts, handles = _capture(model)
    fast = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with record(model) as rec:
        for n, kw in plan:
            model(torch.randn(n, 6, generator=g), **kw).pow(2).mean().backward()
            fast.append(rec._fast)
            opt.step()
            opt.zero_grad()
            rec.step()
    for hd in handles:
        hd.remove()
    # Tensors held by the fast path per step: none on the first step or right after a change of structure,
    # every hook's (fc2 does not run) once a structure repeats; a layer called twice or skipped falls back.
    assert fast == [0, 4, 4, 0, 0, 4, 0, 3, 3, 4]
    h = rec.history
    assert h.series("act", "calls").tolist() == [1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert h.series("extra", "calls").tolist() == [1] * 7 + [0, 1, 1]
    assert h.series("fc2", "calls").tolist() == [0] * 5 + [1] + [0] * 4
    for name in ("fc1", "head", "extra"):
        ref = iter(acts[name])
        rows = [i for i, c in enumerate(h.series(name, "calls")) if c]
        want = [next(ref) for _ in rows]
        np.testing.assert_allclose(h.series(name, "channel_mean")[rows], np.stack([r.double().mean(0) for r in want]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(h.series(name, "channel_var")[rows],
                                   np.stack([r.double().var(0, unbiased=False) for r in want]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(h.series(name, "min")[rows], [r.min() for r in want], rtol=1e-6)
    # the shared activation: both calls merged in step 5, one call elsewhere
    act = acts["act"]
    per_step = [[act[0]], [act[1]], [act[2]], [act[3]], [act[4]], [act[5], act[6]], *[[a] for a in act[7:]]]
    np.testing.assert_allclose(h.series("act", "channel_mean"), np.stack([torch.cat(c).double().mean(0) for c in per_step]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.series("act", "max"), [torch.cat(c).max() for c in per_step], rtol=1e-6)


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "recorders-thread"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_recorded_exactly(monkeypatch, dtype, threaded):
    # Half precision is reduced in float32 (batched, held and in-hook alike), double in double: the recorded
    # statistics (kept in float32) equal a float64 computation on the very values the model produced.
    from bnaudit import recording

    monkeypatch.setattr(recording, "_spare_core", lambda: threaded)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 6, generator=g).to(dtype) for _ in range(4)] + [torch.randn(10000, 6, generator=g).to(dtype)]  # 80000 values: in-hook
    acts, handles = _capture(model)
    with torch.no_grad(), record(model) as rec:
        for x in batches:
            model(x)
            rec.step()
    for hd in handles:
        hd.remove()
    h = rec.history
    tol = 1e-5
    for name in h.layers:
        ref = [r.double() for r in acts[name]]
        np.testing.assert_allclose(h.series(name, "channel_mean"), np.stack([r.mean(0) for r in ref]), rtol=tol, atol=tol)
        np.testing.assert_allclose(h.series(name, "channel_var"), np.stack([r.var(0, unbiased=False) for r in ref]),
                                   rtol=10 * tol, atol=tol)
        np.testing.assert_allclose(h.series(name, "max"), [r.max() for r in ref], rtol=tol)
        np.testing.assert_allclose(h.series(name, "zero_frac"), [(r == 0).double().mean() for r in ref], atol=1e-12)


def test_torch_thread_count_is_restored():
    # Small reductions run with torch's intra-op threads switched off for the call; the user's setting is back
    # after every hook and step, and after the block.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 4))  # 256 x 300: reduced in its hook
        with record(model) as rec:
            for _ in range(3):
                model(torch.randn(256, 8)).sum().backward()
                assert torch.get_num_threads() == 2
                rec.step()
                assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2 and len(rec.history) == 3
    finally:
        torch.set_num_threads(before)
