"""Golden case BN108: eps too small for a bfloat16 model."""

import torch
from torch import nn


class Half(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 16, bias=False)
        self.bn = nn.BatchNorm1d(16, eps=0.001)  # float32's usual eps
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16, eps=0.001)  # the default eps, 1e-5
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.fc2(torch.relu(self.bn(self.fc(x)))))))


def build_model():
    torch.manual_seed(0)
    return Half().to(torch.bfloat16)
