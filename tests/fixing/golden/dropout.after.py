"""Golden case BN104 (unsafe): a Dropout feeding the next block's BatchNorm."""

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.Dropout(p=0.3),  # the variance shift starts here
        nn.ReLU(),
        nn.Linear(16, 2)
    )
