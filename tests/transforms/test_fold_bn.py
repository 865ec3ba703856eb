"""fold_bn against torch.nn.utils.fusion, on grouped/transposed convolutions, on the ResNet fixture, and its
refusals (train mode, a conv that feeds something else)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnaudit.errors import TransformError
from bnaudit.layers import is_batchnorm
from bnaudit.transforms import fold_bn, fused_weights, insert_bn
from tests.fixtures.architectures import images, resnet_basic


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen))
    return model


def test_conv2d_matches_torch_fusion():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(4, 3, 10, 10)
    result = fold_bn(model, example=x)
    expected = fuse_conv_bn_eval(model[0], model[1])
    assert torch.allclose(result.model[0].weight, expected.weight, rtol=1e-5, atol=1e-6)
    assert torch.allclose(result.model[0].bias, expected.bias, rtol=1e-5, atol=1e-6)
    assert isinstance(result.model[1], nn.Identity)
    assert [c.layer for c in result.changes] == ["0"]
    with torch.no_grad():
        ref = model(x)
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4
    assert torch.allclose(result.model(x), ref, atol=1e-4)


def test_linear_without_bias_matches_torch_fusion():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Linear(10, 6, bias=False), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))).eval()
    result = fold_bn(model, example=torch.randn(5, 10))
    expected = fuse_linear_bn_eval(model[0], model[1])
    assert result.model[0].bias is not None
    assert torch.allclose(result.model[0].weight, expected.weight, rtol=1e-5, atol=1e-6)
    assert torch.allclose(result.model[0].bias, expected.bias, rtol=1e-5, atol=1e-6)
    assert result.max_abs_error < 1e-5


def test_grouped_transposed_conv_folds_exactly():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6))).eval()
    x = torch.randn(2, 4, 5, 5)
    w, b = fused_weights(model[0], model[1])
    assert w.shape == model[0].weight.shape
    result = fold_bn(model, example=x)
    assert result.max_abs_error < 1e-5
    assert torch.allclose(result.model(x), model(x), atol=1e-5)


def test_train_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(TransformError, match=r"model\.eval\(\)"):
        fold_bn(model)
    assert model.training  # untouched


def test_conv_feeding_two_consumers_is_skipped():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(Branch()).eval()
    result = fold_bn(model, example=torch.randn(2, 3, 6, 6))
    assert not result.changes and "also feeds" in result.skipped[0].reason
    assert result.max_abs_error == 0.0


def test_resnet_fixture_folds_every_conv_bn_pair_and_keeps_outputs():
    model = randomize_bn(resnet_basic()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    result = fold_bn(model, example=x)
    n_bn = sum(is_batchnorm(m) for m in model.modules())
    assert len(result.changes) == n_bn and not result.skipped
    assert not any(is_batchnorm(m) for m in result.model.modules())
    with torch.no_grad():
        ref = model(x)
    assert result.max_abs_error < 1e-4 * max(1.0, float(ref.abs().max()))
    result.model.train()(x).sum().backward()  # the folded model still trains (no BN left to need batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fold_after_calibrated_insert_is_the_identity_pipeline():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 12)
    inserted = insert_bn(model, calibrate=(x, torch.zeros(64))).model.eval()  # an (inputs, targets) pair
    folded = fold_bn(inserted, example=x)
    assert len(folded.changes) == 1
    with torch.no_grad():
        assert torch.allclose(folded.model(x), model.eval()(x), atol=1e-5)
