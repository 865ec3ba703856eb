"""bnaudit.layers: normalization recognised beyond torch's classes (by class name, by running statistics),
and BatchNorm's strict check kept for the rules that need BatchNorm semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnaudit.layers import batchnorm_layers, is_batchnorm, is_norm, norm_kind
from tests.fixtures.architectures import EvoNorm2dB0, EvoNorm2dS0, RmsNorm2d


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: buffers only, no torch base class."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), value))


class Scaler(nn.Module):
    """Named like nothing, but it keeps a running variance: normalization."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_var", torch.ones(c))


class Normalize(nn.Module):
    """An input transform (torchvision.transforms.Normalize is a Module): fixed mean/std, not a layer."""


class NormMlpClassifierHead(nn.Module):
    """timm's head: a norm, then a Linear. A block holding a weight layer, not a normalization layer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)


class WeightNormLinear(nn.Linear):
    """A weight-normalized Linear: a weight layer, whatever its name."""


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (RmsNorm2d(4), "rms"), (EvoNorm2dS0(8), "evo"), (EvoNorm2dB0(8), "evo"),
        (FrozenBatchNorm2d(4), "frozen-batch"), (Scaler(4), "batch"), (nn.GroupNorm(2, 4), "group"),
        (nn.BatchNorm2d(4), "batch"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v,
)
def test_normalization_layers_beyond_torchs_classes(module, kind):
    assert is_norm(module) and norm_kind(module) == kind


@pytest.mark.parametrize("module", [Normalize(), NormMlpClassifierHead(), WeightNormLinear(2, 2), nn.Linear(2, 2)],
                         ids=lambda m: type(m).__name__)
def test_not_normalization_layers(module):
    assert not is_norm(module) and norm_kind(module) is None


def test_batchnorm_semantics_stay_strict():
    # EvoNorm-B0 and a FrozenBatchNorm2d keep running statistics but are no torch BatchNorm: rules that need
    # momentum, track_running_stats or train-mode batch statistics do not treat them as one.
    assert not is_batchnorm(EvoNorm2dB0(4)) and not is_batchnorm(FrozenBatchNorm2d(4))
    assert is_batchnorm(nn.SyncBatchNorm(4)) and is_batchnorm(nn.LazyBatchNorm1d())


def test_batchnorm_layers_names_every_batchnorm_once_in_module_order():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(
        nn.Linear(3, 4), shared, nn.ReLU(),
        nn.Sequential(nn.Conv1d(4, 4, 1), nn.SyncBatchNorm(4), nn.GroupNorm(2, 4)),
        shared, nn.LazyBatchNorm2d(), FrozenBatchNorm2d(4),
    )
    layers = batchnorm_layers(model)
    assert list(layers) == ["1", "3.1", "5"]
    assert layers["1"] is shared and isinstance(layers["3.1"], nn.SyncBatchNorm)
    assert batchnorm_layers(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2))) == {}
    root = nn.BatchNorm2d(3)
    assert batchnorm_layers(root) == {"": root}
