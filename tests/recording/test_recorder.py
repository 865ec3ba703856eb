"""bnaudit.record: recorded statistics equal a direct computation on stored activations (NC, NCL, NCHW, both
the grouped path for small tensors and the in-hook path for large ones), hooks are gone and the model is
bit-identical afterwards (exceptions included), BatchNorm mode series, exports, and torch.compile."""

from __future__ import annotations

import json
from pathlib import Path

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
    # nothing of the step is kept: no per-call results, no reference to the last reduced tensor
    assert all(not s.calls and s.quant is None for s in rec._slots) and rec._last is None


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
            for _ in range(3):
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
    # reduced in its hook, before F.relu_ overwrites it: the pre-ReLU values, every step
    pre2 = m2.fc(x).detach()
    np.testing.assert_allclose(h.series("fc", "min"), [float(pre2.min())] * 2, rtol=1e-6)
    np.testing.assert_allclose(h.series("fc", "mean"), [float(pre2.double().mean())] * 2, rtol=1e-5)


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
    assert data["schema"] == "bnaudit.history/2" and data["steps"] == [0, 1, 2]
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


def test_mixed_widths_keep_exact_stats():
    # Widths 7, 7, 13, 13, 3: each layer's row equals a direct computation.
    g = torch.Generator().manual_seed(4)
    h, acts = _train_captured(_mlp_5_7_13_3(), [torch.randn(16, 5, generator=g) for _ in range(3)])
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


def _mlp_run(steps: int = 5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(),
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(6)
    return model, [torch.randn(24, 20, generator=g) * 3 + 1 for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_recorded_exactly(dtype):
    # Half precision is reduced in float32, double in double: the recorded statistics (kept in float32) equal a
    # float64 computation on the very values the model produced.
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


def test_torch_thread_count_is_never_touched():
    # The recorder changes no process-wide setting: torch's thread count is the user's throughout.
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


def test_module_called_at_two_widths_in_one_step_is_merged_as_whole_tensors():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 4), nn.Linear(3, 6), nn.Tanh()

        def forward(self, x):
            return self.act(self.a(x)).sum(1) + self.act(self.b(x)).sum(1)

    torch.manual_seed(0)
    m = Shared()
    x = torch.randn(8, 3)
    with torch.no_grad():
        both = torch.cat([m.act(m.a(x)).reshape(-1), m.act(m.b(x)).reshape(-1)]).double()
        with record(m) as rec:
            m(x)
            rec.step()
            m.a(x)  # a step where the activation is not called: NaN there, and one width again
            rec.step()
    h = rec.history
    assert h.series("act", "calls").tolist() == [2, 0]
    np.testing.assert_allclose(h.series("act", "mean")[0], both.mean(), rtol=1e-6)
    np.testing.assert_allclose(h.series("act", "var")[0], both.var(unbiased=False), rtol=1e-5)
    assert h.series("act", "count")[0] == both.numel()
    np.testing.assert_allclose(h.series("act", "zero_frac")[0], 0.0, atol=1e-12)
    assert np.isnan(h.series("act", "channel_mean")[0]).all()  # no channel is the same across widths
    assert np.isnan(h.series("act", "mean")[1])
    assert any("several widths" in n for n in h.notes)


def test_same_tensor_changed_in_place_between_two_hooks_is_reduced_again():
    # The recorder reuses a reduction when the very same tensor comes to the next hook unchanged (a Conv output
    # read by its BatchNorm); a change in place in between (its version counter moves) must not be missed.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            y.mul_(2.0).add_(1.0)
            return self.bn(y)

    torch.manual_seed(0)
    m = Scaled().eval()
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        conv_out = m.conv(x).double()
        with record(m) as rec:
            m(x)
            rec.step()
    h = rec.history
    np.testing.assert_allclose(h.series("conv", "channel_mean")[0], conv_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h.series("bn", "channel_mean")[0], (2 * conv_out + 1).mean((0, 2, 3)), rtol=1e-5)


def test_recording_package_keeps_no_thread_address_key_or_global_toggle():
    # The rules the recorder was rebuilt under (see the package docstring), read off its source: no background
    # thread, nothing keyed on a storage address, no process-wide torch setting changed.
    import bnaudit.recording as pkg

    root = Path(pkg.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        for banned in ("threading", "data_ptr", "set_num_threads", "queue", "atexit"):
            assert banned not in text, f"{path.name} uses {banned}"


def test_third_party_norm_over_the_last_dim_is_recorded_per_feature():
    # A norm class torch does not define, applied to (N, L, F) tokens: its F weights say the channels are last.
    class TokenRMSNorm(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(f))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    model = nn.Sequential(nn.Linear(4, 6), TokenRMSNorm(6))
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(model) as rec:
        inner = model[0](x).double()
        model(x)
        rec.step()
    h = rec.history
    assert h.info["1"]["channel_dim"] == -1 and h.info["1"]["where"] == "input"
    np.testing.assert_allclose(h.series("1", "channel_mean")[0], inner.mean((0, 1)), rtol=1e-5, atol=1e-7)


class _CastingBN(nn.BatchNorm1d):
    """A BatchNorm that takes integer token counts and casts them itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


def test_a_model_whose_recorded_layers_measure_nothing_is_told_why_without_blaming_compile():
    model = nn.Sequential(_CastingBN(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counts = torch.tensor([[0, 7, 9], [12, 1, 6], [3, 3, 0], [5, 2, 8]])
    with pytest.raises(RecordingError) as info, record(model) as rec:
        model(counts).square().mean().backward()
        opt.step()
        rec.step()
    message = str(info.value)
    assert "none of the recorded layers was measured" in message and "integer inputs" in message
    assert "(it is compiled)" not in message
    _no_hooks(model)
