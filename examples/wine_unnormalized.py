"""The seeds' age/income lesson on real data: the wine measurements fed to an MLP without standardizing.

Proline is in the hundreds to thousands, hue around 1, so one feature dominates the first layer (BN201
unnormalized-input, with ``--data``). ``build_data_standardized`` is the fix.

    bnaudit inspect examples/wine_unnormalized.py
"""

from __future__ import annotations

import torch
from torch import nn

from bundled_data import loader


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def build_data():
    return loader("wine", batch_size=32, standardize=False)


def build_data_standardized():
    return loader("wine", batch_size=32, standardize=True)
