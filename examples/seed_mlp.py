"""The seeds' tabular MLP before BatchNorm: Linear -> ReLU -> Dropout blocks, on the digits features.

    bnaudit inspect examples/seed_mlp.py
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
            nn.ReLU(),
            nn.Dropout(p=0.3),
            nn.Linear(128, 64),
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
