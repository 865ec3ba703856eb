"""A model whose auxiliary head (with its own BatchNorm) runs on every other step only: its BatchNorm is
skipped, in train mode, on the steps between."""

import argparse

import torch
from digits import loaders
from rw_common import evaluate
from torch import nn


class AuxNet(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)
        self.aux = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x, with_aux=False):
        h = self.body(x)
        return (self.head(h), self.aux(h)) if with_aux else (self.head(h), None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=64)
    model = AuxNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            out, aux = model(x, with_aux=step % 2 == 0)
            loss = nn.functional.cross_entropy(out, y)
            if aux is not None:
                loss = loss + 0.4 * nn.functional.cross_entropy(aux, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        print(f"val accuracy {evaluate(model, val):.3f}")


if __name__ == "__main__":
    main()
