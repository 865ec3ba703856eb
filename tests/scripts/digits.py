"""Data and model shared by the training scripts in this folder, imported the way a project imports its own
``data.py`` (the script's folder is ``sys.path[0]``): sklearn's bundled digits, standardized, as DataLoaders."""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def loaders(batch_size=64, drop_last=True, limit=None):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)
    if limit:
        x, y = x[:limit], y[:limit]
    cut = int(0.8 * len(x))
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=batch_size, shuffle=True, drop_last=drop_last,
                       generator=g)
    val = DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=256)
    return train, val


class BNMLP(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)
