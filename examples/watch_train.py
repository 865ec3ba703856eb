"""A small, ordinary training script with one real mistake, for ``bnaudit watch``.

It trains a BatchNorm MLP on sklearn's bundled digits and evaluates after every epoch, but ``evaluate()``
forgets ``model.eval()``: under ``torch.no_grad()`` the BatchNorm layers are still in train mode, so every
validation batch overwrites their running statistics with validation data.

    python examples/watch_train.py --epochs 3               # trains; nothing looks wrong
    bnaudit watch examples/watch_train.py --epochs 3        # the same run, audited: BN306 at evaluate()'s line
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build_data(batch_size):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = TensorDataset(x[:1400], y[:1400])
    val = TensorDataset(x[1400:], y[1400:])
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=128))


class Net(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.features(x))


def evaluate(model, loader):
    correct = 0
    with torch.no_grad():                        # the mistake: no model.eval() before this loop
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(loader.dataset)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    torch.manual_seed(0)
    train, val = build_data(args.batch_size)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, val accuracy {evaluate(model, val):.3f}")


if __name__ == "__main__":
    main()
