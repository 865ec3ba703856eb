"""A Conv2d -> BatchNorm2d -> ReLU CNN on the 8×8 digits, wired the way the seeds recommend (no bias before
BatchNorm, no BatchNorm on the output). Expected: no architecture findings.

    bnaudit inspect examples/cnn.py
"""

from __future__ import annotations

import torch
from torch import nn

from bundled_data import loader


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_block(1, 16), conv_block(16, 32), nn.MaxPool2d(2), conv_block(32, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def build_data():
    return loader("digits", batch_size=64, image=True)


def predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs).argmax(dim=1)
