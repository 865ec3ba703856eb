"""Real batches for the `bnaudit check` tests: the first 256 of sklearn's digits, scaled to [0, 1]."""

import torch


def build_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:256] / 16.0, dtype=torch.float32)
    return torch.utils.data.TensorDataset(x, torch.tensor(y[:256]))
