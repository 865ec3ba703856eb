"""Small models for the `bnaudit check` tests: one with normalization mistakes, one without.

`build_bad` puts a biased Linear before BatchNorm (BN101 on layers `0` and `3`); `build_clean` is a
plain, correctly wired MLP. There is no `build_data` here on purpose, so audits without `data:` stay
static; real batches are in check_data.py."""

import torch
from torch import nn


def build_bad():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 10),
    )


def build_clean():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

