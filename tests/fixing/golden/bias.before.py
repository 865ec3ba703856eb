"""Golden case BN101: biases a BatchNorm cancels. Comments and odd formatting must survive the fix."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # the first block: bn1 subtracts fc1's bias away
        self.fc1 = nn.Linear(10,   16)   # odd spacing, kept
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(
            16,
            16,
            True,  # the bias, passed positionally
        )
        self.bn2 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)  # feeds no BatchNorm: left alone

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)


def build_model():
    torch.manual_seed(0)
    return Net()
