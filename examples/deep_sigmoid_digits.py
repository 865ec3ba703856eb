"""A deep sigmoid MLP on the 8×8 digits: the seeds' "BatchNorm allows higher learning rates and converges
faster" on a poorly conditioned problem (Ioffe & Szegedy 2015 trained sigmoid networks for the same reason).

Four hidden Linear(64) -> Sigmoid layers and no normalization. Plain SGD barely moves it in a few hundred
steps at any learning rate (saturating sigmoids, vanishing gradients); with BatchNorm inserted after each
hidden Linear layer (``bnaudit.insert_bn``) it reaches the target loss in tens of steps, and keeps doing so at
learning rates where the baseline is stuck.

    bnaudit train-compare examples/deep_sigmoid_digits.py --lr 0.1,1,4 --plot plots/deep_sigmoid
    python examples/deep_sigmoid_digits.py        # the same comparison from Python
"""

from __future__ import annotations

import torch
from bundled_data import arrays
from torch import nn

DEPTH = 4
WIDTH = 64
LRS = (0.1, 1.0, 4.0)


def build_model(depth: int = DEPTH, width: int = WIDTH, activation: type[nn.Module] = nn.Sigmoid) -> nn.Module:
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), activation()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def build_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: standardized 64-pixel features and integer labels (train-compare splits off 20%)."""
    return arrays("digits")


if __name__ == "__main__":
    from bnaudit.training import train_compare

    result = train_compare(build_model(), build_data(), variants=("baseline", "bn"), lrs=LRS)
    print("\n".join(result.verdict))
