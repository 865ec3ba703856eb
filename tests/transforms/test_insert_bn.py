"""insert_bn on real small architectures: the VGG-11-BN layout, nothing inserted twice, function-preserving
calibration on real data (sklearn digits), sequence Linears, untraceable models, placement, and the original
model left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from bnaudit.errors import TransformError, UsageError
from bnaudit.graph import leaf_modules
from bnaudit.layers import is_batchnorm, is_conv
from bnaudit.transforms import FeatureBatchNorm1d, NormalizedLayer, insert_bn
from tests.fixtures.architectures import (
    early_exit_cnn,
    images,
    mobilenet_v2,
    resnet_basic,
    resnet_bottleneck,
    vgg11,
    vgg11_bn,
)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, int]], str, dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, id(m)) for n, m in model.named_modules()], repr(model), {n: m.training for n, m in model.named_modules()}


def assert_unchanged(model: nn.Module, before) -> None:
    state, mods, text, modes = snapshot(model)
    assert mods == before[1] and text == before[2] and modes == before[3]
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]), k


def layout(model: nn.Module, example: torch.Tensor) -> list[tuple]:
    """Leaf modules in execution order with the numbers that define the architecture."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(m)) for m in leaf_modules(model).values()]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in order:
        if is_conv(m):
            out.append(("conv", m.in_channels, m.out_channels, m.bias is not None))
        elif is_batchnorm(m):
            out.append((type(m).__name__, m.num_features))
        else:
            out.append((type(m).__name__,))
    return out


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def trained_mlp() -> nn.Module:
    """An MLP trained a little on digits, so its biases and activations are not at their initial values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(30):
        xb, yb = x[i * 32 % 1700:][:64], y[i * 32 % 1700:][:64]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model


class DigitsCNN(nn.Module):
    """A custom module with its own forward (functional relu, flatten) on 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 24)
        self.out = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.out(torch.relu(self.fc(x)))


def test_vgg11_conv_only_gives_vgg11_bn_layout():
    model, x = vgg11(), images()
    before = snapshot(model)
    result = insert_bn(model, example=x, layers=("conv",))
    assert layout(result.model, x) == layout(vgg11_bn(), x)
    assert len(result.changes) == 8 and all(c.action == "insert" for c in result.changes)
    assert not result.skipped  # the Linear layers are not candidates with layers=("conv",)
    # every new BatchNorm is a BatchNorm2d sized by the conv's out_channels, wrapped right after it
    for change in result.changes:
        wrapper = result.model.get_submodule(change.layer)
        assert isinstance(wrapper, NormalizedLayer)
        assert type(wrapper[1]) is nn.BatchNorm2d and wrapper[1].num_features == wrapper[0].out_channels
        assert wrapper.out_channels == wrapper[0].out_channels  # attributes still answer through the wrapper
    assert_unchanged(model, before)


def test_vgg11_all_layers_skip_only_output():
    result = insert_bn(vgg11(), example=images())
    assert [c.layer for c in result.skipped] == ["classifier.6"]
    assert "output layer" in result.skipped[0].reason
    linear_bns = [type(result.model.get_submodule(c.new)) for c in result.changes if c.layer.startswith("classifier")]
    assert linear_bns == [nn.BatchNorm1d, nn.BatchNorm1d]
    with_output = insert_bn(vgg11(), example=images(), skip_output=False)
    assert len(with_output.changes) == 11 and not with_output.skipped


@pytest.mark.parametrize("factory", [resnet_basic, resnet_bottleneck, mobilenet_v2])
def test_models_with_bn_get_nothing_twice(factory):
    model, x = factory(), images()
    before = snapshot(model)
    result = insert_bn(model, example=x)
    convs = {n for n, m in model.named_modules() if is_conv(m)}
    assert convs and not [c for c in result.changes if c.layer in convs]
    assert {c.layer for c in result.skipped} >= convs
    assert all("already feeds" in c.reason for c in result.skipped if c.layer in convs)
    n_bn = sum(is_batchnorm(m) for m in model.modules())
    assert sum(is_batchnorm(m) for m in result.model.modules()) == n_bn + len(result.changes)
    assert_unchanged(model, before)


def test_calibrated_insertion_preserves_function_on_digits():
    model = trained_mlp()
    x, _ = digits()
    before = snapshot(model)
    result = insert_bn(model, calibrate=torch.utils.data.DataLoader(x, batch_size=100))
    assert len(result.changes) == 2
    new = result.model.eval()
    with torch.no_grad():
        ref, out = model.eval()(x), new(x)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5
    assert result.max_abs_error is not None and result.max_abs_error < 1e-5 * float(ref.abs().max())
    # the statistics are those of the hidden pre-activations over the whole data set
    bn = new[0][1]
    with torch.no_grad():
        pre = x @ model[0].weight.T  # bias dropped: BatchNorm's shift carries it
    assert torch.allclose(bn.running_mean, pre.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, pre.var(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(bn.bias, pre.mean(0) + model[0].bias, atol=1e-5)
    model.train()
    assert_unchanged(model, before)


@pytest.mark.parametrize("drop_bias,placement", [(True, "after-layer"), (False, "after-layer"), (True, "after-activation")])
def test_calibrated_cnn_keeps_eval_outputs(drop_bias, placement):
    torch.manual_seed(1)
    model = DigitsCNN()
    x, _ = digits()
    x = x.reshape(-1, 1, 8, 8)[:512]
    result = insert_bn(model, calibrate=[x[:200], x[200:]], drop_bias=drop_bias, placement=placement)
    with torch.no_grad():
        ref, out = model.eval()(x), result.model.eval()(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if placement == "after-layer":
        assert [c.layer for c in result.changes] == ["conv1", "conv2", "fc"]
        assert (result.model.conv1.bias is None) == drop_bias
    else:
        # activations here are functional calls, which cannot be wrapped: every layer is skipped with the reason
        assert not result.changes and all("function call" in c.reason for c in result.skipped if c.layer != "out")


def test_after_activation_wraps_activation_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2))
    result = insert_bn(model, example=torch.randn(8, 10), placement="after-activation")
    assert [c.layer for c in result.changes] == ["0", "2"]
    assert isinstance(result.model[1], NormalizedLayer) and isinstance(result.model[1][0], nn.ReLU)
    assert isinstance(result.model[1][1], nn.BatchNorm1d)
    assert result.model[0].bias is not None  # the activation sits between: the bias is not redundant


def test_output_layer_found_through_a_parameter_free_head():
    # The last Linear reaches the output through Sigmoid() and Flatten(): still the output layer.
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid(), nn.Flatten(0))
    result = insert_bn(model, example=torch.randn(8, 10))
    assert [c.layer for c in result.changes] == ["0"]
    assert [(c.layer, c.reason.split(" (")[0]) for c in result.skipped] == [("2", "output layer")]
    assert isinstance(result.model[2], nn.Linear) and isinstance(result.model[3], nn.Sigmoid)


class SharedActivation(nn.Module):
    """One ReLU module applied after two Linear layers (twice per forward), or twice to one layer's output."""

    def __init__(self, same_input: bool = False) -> None:
        super().__init__()
        self.same_input = same_input
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_input:
            h = self.a(x)
            return self.head(self.act(h) + self.act(h))
        return self.head(self.act(self.b(self.act(self.a(x)))))


@pytest.mark.parametrize("same_input", [False, True])
def test_after_activation_refuses_a_shared_activation(same_input):
    model = SharedActivation(same_input)
    result = insert_bn(model, example=torch.randn(8, 10), placement="after-activation")
    reasons = {c.layer: c.reason for c in result.skipped}
    assert reasons["a"] == "its activation act is shared by other layers; wrapping it would normalize them too"
    assert not result.changes and type(result.model.act) is nn.ReLU
    # with the BatchNorm after the layer instead, nothing is shared and both get one
    after = insert_bn(model, example=torch.randn(8, 10))
    assert [c.layer for c in after.changes] == (["a"] if same_input else ["a", "b"])


def test_linear_on_sequences_normalizes_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(5, 7, 6) * 3 + 2
    result = insert_bn(model, example=x)
    bn = result.model[0][1]
    assert isinstance(bn, FeatureBatchNorm1d) and bn.num_features == 12
    assert "last axis" in result.changes[0].reason
    out = result.model[0].train()(x)
    assert out.shape == (5, 7, 12)
    flat = out.reshape(-1, 12)
    assert flat.mean(0).abs().max() < 1e-5 and (flat.var(0, unbiased=False) - 1).abs().max() < 1e-3
    # and 2-D input through the same module is plain BatchNorm1d
    assert torch.allclose(bn(torch.ones(4, 12) * torch.arange(4.0)[:, None]).mean(0), torch.zeros(12), atol=1e-6)


def test_conv_kinds_get_matching_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(2), nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Unflatten(2, (4, 4, 4)), nn.ConvTranspose3d(6, 5, 2, stride=2), nn.ReLU(),
        nn.Conv3d(5, 1, 1),
    )
    result = insert_bn(model, example=torch.randn(2, 2, 4, 4, 4))
    kinds = {c.layer: type(result.model.get_submodule(c.new)).__name__ for c in result.changes}
    assert kinds == {"0": "BatchNorm3d", "3": "BatchNorm1d", "6": "BatchNorm3d"}
    assert result.model[6][1].num_features == 5
    result.model.train()(torch.randn(3, 2, 4, 4, 4)).sum().backward()


def test_untraceable_model_uses_runtime_graph_and_still_runs():
    model, x = early_exit_cnn(), images(4, 16)
    result = insert_bn(model, example=x)
    assert result.graph_method == "hooks"
    assert not [c for c in result.changes if c.layer.startswith(("stem", "deep"))]  # BN already there
    assert [c.layer for c in result.skipped if "output layer" in c.reason] == ["head"]
    # the same untraceable forward without BatchNorm: every conv gets one
    plain = early_exit_cnn()
    plain.stem[1], plain.deep[1] = nn.Identity(), nn.Identity()
    result = insert_bn(plain, example=x)
    assert {c.layer for c in result.changes} == {"stem.0", "deep.0"}
    out = result.model.train()(x)
    out.sum().backward()
    assert result.model.stem[0][0].weight.grad is not None


def test_forward_backward_and_dtype_device_kept():
    model = DigitsCNN().double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    result = insert_bn(model, example=x)
    for c in result.changes:
        bn = result.model.get_submodule(c.new)
        assert bn.weight.dtype == torch.float64 and bn.running_mean.device == x.device
    out = result.model.train()(x)
    out.sum().backward()
    assert all(p.grad is not None for p in result.model.parameters())


def test_shared_layer_and_functional_weights_are_skipped():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(8, 8)
            self.tied = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = torch.relu(self.block(torch.relu(self.block(x))))
            x = torch.relu(F.linear(x, self.tied.weight))
            return self.head(x)

    result = insert_bn(Shared(), example=torch.randn(4, 8))
    reasons = {c.layer: c.reason for c in result.skipped}
    assert "called 2 times" in reasons["block"]
    assert "never called as a module" in reasons["tied"]
    assert not result.changes


def test_without_example_traceable_models_still_work():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 2))
    result = insert_bn(model)
    assert result.graph_method == "fx"
    assert isinstance(result.model[0][1], nn.BatchNorm2d) and isinstance(result.model[3][1], FeatureBatchNorm1d)
    assert result.model.train()(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_bad_options_and_missing_example_are_clear_errors():
    with pytest.raises(UsageError, match="layers"):
        insert_bn(vgg11(), layers=("conv", "attention"))
    with pytest.raises(UsageError, match="placement"):
        insert_bn(vgg11(), placement="before")
    with pytest.raises(TransformError, match="example"):
        insert_bn(early_exit_cnn())


def test_result_does_not_share_tensors_with_original():
    model = vgg11()
    result = insert_bn(model, example=images())
    with torch.no_grad():
        for p in result.model.parameters():
            p.add_(1.0)
    assert torch.equal(model.features[0].weight, copy.deepcopy(vgg11()).features[0].weight)


def test_layer_normalized_after_its_activation_is_not_normalized_again():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    result = insert_bn(model, example=torch.randn(4, 6))
    assert [c.layer for c in result.changes] == ["3"]
    assert "already feeds BatchNorm1d 2" in {c.layer: c.reason for c in result.skipped}["0"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_stays_on_cuda_and_calibrates():
    model = DigitsCNN().cuda()
    x = torch.randn(16, 1, 8, 8, device="cuda")
    result = insert_bn(model, calibrate=[x])
    assert all(t.is_cuda for t in [*result.model.parameters(), *result.model.buffers()])
    with torch.no_grad():
        ref, out = model.eval()(x), result.model.eval()(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
