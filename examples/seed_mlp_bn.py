"""The seeds' tabular MLP after BatchNorm, exactly as taught: Linear -> BatchNorm1d -> ReLU -> Dropout.

bnaudit finds two things the material does not mention: each Linear's bias is cancelled by the BatchNorm's
mean subtraction (BN101), and the first block's Dropout feeds the second BatchNorm (BN104, variance shift).

    bnaudit inspect examples/seed_mlp_bn.py
"""

from __future__ import annotations

import torch
from torch import nn

from bundled_data import loader


class MyNN(nn.Module):
    def __init__(self, num_features: int = 64) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(num_features, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Dropout(p=0.3),
            nn.Linear(128, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Dropout(p=0.3),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MyNN(num_features=64)


def build_data():
    return loader("digits", batch_size=64)


def predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs).argmax(dim=1)
