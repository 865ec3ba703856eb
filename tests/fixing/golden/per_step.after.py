"""Golden case BN105 (unsafe): one BatchNorm called at every step of a loop."""

import torch
from torch import nn


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(10, 10, bias=False)
        self.bn = nn.ModuleList([nn.BatchNorm1d(10) for _ in range(3)])  # shared by every step
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        h = x
        for step in range(3):
            h = torch.tanh(self.bn[step](self.cell(h)))  # the same statistics for each step
        return self.head(h)


def build_model():
    torch.manual_seed(0)
    return Recurrent()
