"""Golden case BN103 (unsafe): a BatchNorm on the model's output."""

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 2),
        nn.BatchNorm1d(2),  # normalizes the logits
    )
