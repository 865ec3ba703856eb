"""Safe fixes keep a trained model's function: a small MLP trained on scikit-learn's digits, its checkpoint
fixed alongside the source (``--weights`` and ``-o``), compared with the original in eval mode and over one
training step. Also: the user's checkpoint is never modified, and stale running statistics are recalibrated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnaudit

sklearn_datasets = pytest.importorskip("sklearn.datasets")

SOURCE = '''"""A trained-model fixture: a bias before BatchNorm (BN101) and a Keras momentum (BN106)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.BatchNorm1d(32, momentum=0.99),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def build_data():
    x = load_digits().data.astype(np.float32)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return [torch.tensor(x[i:i + 128]) for i in range(0, 1024, 128)]
'''


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = sklearn_datasets.load_digits()
    x = bunch.data.astype(np.float32)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return torch.tensor(x), torch.tensor(bunch.target)


def _build(text: str, folder: Path) -> nn.Module:
    """The model the source text builds, from a copy under a new name (Python caches an imported file by its
    path, so importing the fixed file again would give the old model)."""
    copy = folder / f"copy{len(list(folder.glob('copy*.py')))}.py"
    copy.write_text(text)
    return bnaudit.load_model(str(copy)).module


def _trained(tmp_path: Path) -> tuple[Path, Path, nn.Module]:
    path = tmp_path / "model.py"
    path.write_text(SOURCE)
    model = _build(SOURCE, tmp_path)
    x, y = _digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    weights = tmp_path / "trained.pt"
    torch.save(model.state_dict(), weights)
    return path, weights, model


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    return loss.detach(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bn101_fold_keeps_eval_outputs_and_the_training_step(tmp_path: Path) -> None:
    path, weights, original = _trained(tmp_path)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "fixed.pt"
    result = bnaudit.fix(f"{path}:build_model", weights=weights, output=out, select=["BN101"])
    assert [(o.code, o.layer, o.status) for o in result.applied] == [("BN101", "0", "applied")]
    assert set(result.written) == {path.resolve(), out}
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # the user's checkpoint is untouched

    fixed = _build(path.read_text(), tmp_path)
    state = torch.load(out, weights_only=True)
    assert "0.bias" not in state
    fixed.load_state_dict(state, strict=True)
    x, y = _digits()
    original.eval()
    fixed.eval()
    with torch.no_grad():
        assert _relative(fixed(x), original(x)) < 1e-5

    # One training step on the same batch: the same loss, the same gradients and updates for every shared
    # parameter, and the running mean still offset by exactly the folded bias. (Not bit-identical: the bias
    # is added and subtracted again in float32 in the original, so both agree to rounding.)
    bias = original[0].bias.detach().clone()
    loss_a, grads_a = _step(original, x[:128], y[:128])
    loss_b, grads_b = _step(fixed, x[:128], y[:128])
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert set(grads_b) == set(grads_a) - {"0.bias"}
    for name, grad in grads_b.items():
        torch.testing.assert_close(grad, grads_a[name], rtol=1e-4, atol=1e-6)
    assert float(grads_a["0.bias"].abs().max()) < 1e-5  # the bias it drops learned nothing
    for (name, p), q in zip(fixed.named_parameters(), [p for n, p in original.named_parameters() if n != "0.bias"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(fixed[1].running_mean, original[1].running_mean - bias, rtol=1e-5, atol=1e-5)


def test_bn106_keeps_outputs_and_gradients_exactly(tmp_path: Path) -> None:
    path, weights, original = _trained(tmp_path)
    out = tmp_path / "fixed.pt"
    result = bnaudit.fix(str(path), weights=weights, output=out, select=["BN106"])
    assert [(o.code, o.detail) for o in result.applied] == [
        ("BN106", "momentum=0.99 -> 0.01 (PyTorch momentum = 1 - Keras momentum)")]
    fixed = _build(path.read_text(), tmp_path)
    fixed.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert fixed[1].momentum == pytest.approx(0.01)
    x, y = _digits()
    original.eval()
    fixed.eval()
    with torch.no_grad():
        assert torch.equal(fixed(x), original(x))
    loss_a, grads_a = _step(original, x[:128], y[:128])
    loss_b, grads_b = _step(fixed, x[:128], y[:128])
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_b[n], g) for n, g in grads_a.items())


def test_stale_running_statistics_are_recalibrated_into_the_output(tmp_path: Path) -> None:
    path, weights, original = _trained(tmp_path)
    state = original.state_dict()
    state["1.running_mean"] = state["1.running_mean"] + 4.0  # statistics that no longer fit the data
    torch.save(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "fixed.pt"
    result = bnaudit.fix(str(path), weights=weights, output=out, select=["BN302", "BN101"])
    assert ("BN302", "1") in {(f.code, f.layer) for f in result.before.findings}
    assert ("BN302", "applied") in {(o.code, o.status) for o in result.outcomes}
    assert "BN302" not in {f.code for f in result.after.findings}
    assert any("re-estimated" in note for note in result.checkpoint_notes)
    fixed = torch.load(out, weights_only=True)
    assert float((fixed["1.running_mean"] - state["1.running_mean"]).abs().max()) > 1.0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest


def test_without_an_output_the_checkpoint_fix_is_only_listed(tmp_path: Path) -> None:
    path, weights, original = _trained(tmp_path)
    state = original.state_dict()
    state["1.running_mean"] = state["1.running_mean"] + 4.0
    torch.save(state, weights)
    result = bnaudit.fix(str(path), weights=weights, select=["BN302"], diff=True)
    assert [(o.code, o.status) for o in result.outcomes] == [("BN302", "skipped")]
    assert "-o OUT" in result.outcomes[0].detail and result.written == []


FROZEN = '''"""A fine-tuning fixture: the first BatchNorm's weights are frozen, but model.train() still moves its
statistics (BN305)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model[1].requires_grad_(False)
    return model


def build_data():
    x = load_digits().data.astype(np.float32)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return [torch.tensor(x[i:i + 64]) for i in range(0, 512, 64)]
'''


def test_frozen_batchnorm_is_swapped_into_a_bnaudit_model_file(tmp_path: Path) -> None:
    path = tmp_path / "frozen.py"
    path.write_text(FROZEN)
    model = _build(FROZEN, tmp_path)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
    weights, out = tmp_path / "w.pt", tmp_path / "frozen-fixed.pt"
    torch.save(model.state_dict(), weights)
    result = bnaudit.fix(str(path), weights=weights, output=out, select=["BN305"])
    assert [(o.code, o.layer, o.status) for o in result.outcomes] == [("BN305", "1", "applied")]
    assert "BN305" not in {f.code for f in result.after.findings}
    fixed = bnaudit.load_model(str(out)).module
    assert type(fixed[1]).__name__ == "FrozenBatchNorm1d"
    x, _ = _digits()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        fixed.train()  # frozen: train mode changes nothing
        assert _relative(fixed(x), expected) < 1e-5


def test_a_bnaudit_model_file_gets_its_statistics_recalibrated(tmp_path: Path) -> None:
    from bnaudit.transforms.base import TransformResult
    from bnaudit.transforms.saving import save_model

    path, _, original = _trained(tmp_path)
    with torch.no_grad():
        original[1].running_mean += 4.0
    model_file, out = tmp_path / "model.pt", tmp_path / "fixed.pt"
    save_model(TransformResult("swap_norm", original, options={"to": "frozen"}), model_file,
               source=f"{path}:build_model")
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    result = bnaudit.fix(str(model_file), data=f"{path}:build_data", output=out, select=["BN302", "BN101"])
    status = {(o.code, o.status) for o in result.outcomes}
    assert status == {("BN302", "applied"), ("BN101", "not-fixable")}
    assert result.written == [out] and result.diff == ""
    fixed = bnaudit.load_model(str(out)).module
    assert float((fixed[1].running_mean - original[1].running_mean).abs().max()) > 1.0
    assert "BN302" not in {f.code for f in bnaudit.inspect(str(out), f"{path}:build_data").findings}
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest


def test_bn108_changes_bfloat16_outputs_by_less_than_their_resolution(tmp_path: Path) -> None:
    path, weights, _ = _trained(tmp_path)
    half = SOURCE.replace("nn.BatchNorm1d(32, momentum=0.99)", "nn.BatchNorm1d(32, eps=1e-5)").replace(
        "        nn.Linear(32, 10),\n    )", "        nn.Linear(32, 10),\n    ).to(torch.bfloat16)")
    path.write_text(half)
    original = _build(half, tmp_path)
    original.load_state_dict(torch.load(weights, weights_only=True))
    out = tmp_path / "fixed.pt"
    result = bnaudit.fix(str(path), weights=weights, output=out, select=["BN108"])
    assert [(o.code, o.detail) for o in result.applied] == [
        ("BN108", "eps=1e-05 -> 0.001 (smallest safe for torch.bfloat16)")]
    fixed = _build(path.read_text(), tmp_path)
    fixed.load_state_dict(torch.load(out, weights_only=True))
    x, _ = _digits()
    original.eval()
    fixed.eval()
    with torch.no_grad():
        a, b = original(x.to(torch.bfloat16)).float(), fixed(x.to(torch.bfloat16)).float()
    # eps enters as 1/sqrt(var + eps): a relative change of (1e-3 - 1e-5) / (2 var), below bfloat16's
    # resolution (2**-8) for the trained variances; not zero, which is why BN108 is safe only to that bound.
    assert _relative(b, a) < 2 ** -7
