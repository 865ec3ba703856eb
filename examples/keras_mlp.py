"""The seeds' Keras-style MNIST MLP (Flatten, Dense 128, ReLU, Dense 64, ReLU, Dense 10) on 8×8 digits.

``build_model`` is the network without BatchNorm; ``build_model_bn`` is its BatchNorm twin ported from Keras
word for word, including Keras's ``momentum=0.99``, which in PyTorch means the opposite (BN106).

    bnaudit inspect examples/keras_mlp.py
    bnaudit inspect examples/keras_mlp.py:build_model_bn --data examples/keras_mlp.py:build_data
"""

from __future__ import annotations

import torch
from torch import nn

from bundled_data import arrays
from torch.utils.data import DataLoader, TensorDataset


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def build_model_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.BatchNorm1d(128, momentum=0.99),  # Keras's BatchNormalization() default, carried over verbatim
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.BatchNorm1d(64, momentum=0.99),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def build_data() -> DataLoader:
    x, y = arrays("digits")
    dataset = TensorDataset(x.reshape(-1, 8, 8), y)  # 28×28 in the seed; 8×8 here
    return DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs).softmax(dim=1)
