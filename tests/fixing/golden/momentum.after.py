"""Golden case BN106: momenta ported from Keras (0.99 there is 0.01 here)."""

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16, bias=False),
        nn.BatchNorm1d(16, momentum=0.01),  # Keras's default, carried over
        nn.ReLU(),
        nn.Linear(16, 16, bias=False),
        nn.BatchNorm1d(16, 1e-5, 0.1),  # eps and momentum passed positionally
        nn.ReLU(),
        nn.Linear(16, 2),
    )
