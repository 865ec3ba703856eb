"""Golden case BN107 (unsafe): a BatchNorm without running statistics."""

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16, bias=False),
        nn.BatchNorm1d(16, track_running_stats=False),  # batch statistics in eval too
        nn.ReLU(),
        nn.Linear(16, 2),
    )
