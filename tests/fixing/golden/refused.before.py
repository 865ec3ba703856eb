"""Golden case: findings bnaudit must not fix automatically (the file stays as it is)."""

import torch
from torch import nn

MOMENTUM = 0.99


class Looped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(10 if i == 0 else 16, 16) for i in range(2)])  # built in a loop
        self.bns = nn.ModuleList([nn.BatchNorm1d(16) for _ in range(2)])
        self.bn_cfg = nn.BatchNorm1d(16, momentum=MOMENTUM)  # from a constant, not a literal
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        for fc, bn in zip(self.fcs, self.bns):
            x = torch.relu(bn(fc(x)))
        return self.head(self.bn_cfg(x))


def build_model():
    torch.manual_seed(0)
    return Looped()
