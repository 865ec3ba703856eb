"""swap_norm: group counts, affine copies, the frozen and sync forms keep eval outputs, the swapped models
train (GroupNorm even at batch size 1), and the original is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.layers import is_batchnorm, is_norm, norm_kind
from bnaudit.transforms import FeatureBatchNorm1d, FrozenBatchNorm2d, insert_bn, swap_norm
from bnaudit.transforms.swap_norm import group_count
from tests.fixtures.architectures import images, mobilenet_v2, resnet_basic
from tests.transforms.test_fold_bn import randomize_bn


@pytest.mark.parametrize(
    "channels,groups", [(64, 32), (256, 32), (16, 8), (6, 3), (7, 1), (3, 1), (1, 1), (100, 25), (96, 32), (24, 12)]
)
def test_group_count(channels, groups):
    g = group_count(channels)
    assert g == groups and channels % g == 0 and (g == 1 or channels // g >= 2)


def test_group_swap_copies_affine_and_trains_at_batch_size_one():
    model = randomize_bn(resnet_basic())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = swap_norm(model, "group")
    bns = [n for n, m in model.named_modules() if is_batchnorm(m)]
    assert [c.layer for c in result.changes] == bns and not result.skipped
    for name in bns:
        old, new = model.get_submodule(name), result.model.get_submodule(name)
        assert isinstance(new, nn.GroupNorm) and new.num_channels == old.num_features
        assert new.num_groups == group_count(old.num_features)
        assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)
    result.model.train()
    out = result.model(images(1))  # BatchNorm could not train on one sample; GroupNorm can
    out.sum().backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_keeps_eval_outputs_and_never_trains():
    model = randomize_bn(mobilenet_v2()).eval()
    x = images()
    result = swap_norm(model, "frozen", example=x)
    assert result.max_abs_error is not None and result.max_abs_error < 1e-5
    frozen = [m for m in result.model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == sum(is_batchnorm(m) for m in model.modules())
    assert all(is_norm(m) and norm_kind(m) == "frozen-batch" for m in frozen)
    assert all(not list(m.parameters()) for m in frozen)
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    result.model.train()(x).sum().backward()
    assert all(torch.equal(v, state[k]) for k, v in result.model.state_dict().items())


def test_sync_keeps_outputs_and_runs_on_cpu():
    model = randomize_bn(resnet_basic()).eval()
    x = images()
    result = swap_norm(model, "sync", example=x)
    assert all(type(m) is nn.SyncBatchNorm for m in result.model.modules() if is_batchnorm(m))
    assert result.max_abs_error == 0.0 or result.max_abs_error < 1e-6
    # No process group: in training SyncBatchNorm is BatchNorm: same outputs, gradients and running statistics.
    reference, sync = copy.deepcopy(model).train(), result.model.train()
    out, ref = sync(x), reference(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in sync.named_parameters():
        assert p.grad is not None and torch.allclose(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6), name
    buffers = dict(reference.named_buffers())
    moved = [name for name, b in sync.named_buffers() if name.endswith("running_mean")]
    assert moved and all(torch.allclose(sync.get_buffer(n), buffers[n], atol=1e-6) for n in moved)
    assert not torch.equal(sync.get_buffer(moved[0]), model.get_buffer(moved[0]))  # they did move


def test_instance_and_layer_targets():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)
    )
    x = torch.randn(3, 2, 8)
    inst = swap_norm(model, "instance", example=x)
    assert isinstance(inst.model[1], nn.InstanceNorm1d)
    assert [c.layer for c in inst.skipped] == ["5"] and "no spatial" in inst.skipped[0].reason
    no_rank = swap_norm(model, "instance")  # without an example the BatchNorm1d input rank is unknown
    assert {c.layer for c in no_rank.skipped} == {"1", "5"}
    layer = swap_norm(model, "layer", example=x)
    assert all(isinstance(layer.model[i], nn.GroupNorm) and layer.model[i].num_groups == 1 for i in (1, 5))
    layer.model.train()(x).sum().backward()


def test_feature_batchnorm_swaps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 5, 4)
    inserted = insert_bn(model, calibrate=x).model.eval()
    assert isinstance(inserted[0][1], FeatureBatchNorm1d)
    layer = swap_norm(inserted, "layer", example=x)
    assert isinstance(layer.model[0][1], nn.LayerNorm)
    frozen = swap_norm(inserted, "frozen", example=x)
    assert frozen.model[0][1].channel_last and frozen.max_abs_error < 1e-5
    assert type(frozen.model[0][1]).__name__ == "FrozenBatchNorm1d" and is_norm(frozen.model[0][1])
    group = swap_norm(inserted, "group", example=x)
    assert not group.changes and "last axis" in group.skipped[0].reason


def test_explicit_groups_and_bad_targets():
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.Conv2d(12, 10, 1), nn.BatchNorm2d(10))
    result = swap_norm(model, "group", groups=4)
    assert result.model[1].num_groups == 4 and "do not split" in result.skipped[0].reason
    with pytest.raises(UsageError, match="choose one of"):
        swap_norm(model, "batch")
    with pytest.raises(UsageError):
        swap_norm(model, "group", groups=0)
