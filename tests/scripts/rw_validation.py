"""Validation every epoch done right, on two validation loaders: model.eval() under torch.no_grad() (or
torch.inference_mode() with --inference), then model.train() for the next epoch."""

import argparse

import torch
from digits import BNMLP, loaders
from rw_common import evaluate
from torch import nn
from torch.utils.data import DataLoader


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--inference", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=128)
    small = DataLoader(val.dataset, batch_size=7)  # a second loader with a short last batch (eval: no BN202)
    model = BNMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        a, b = evaluate(model, val, inference=args.inference), evaluate(model, small, inference=args.inference)
        print(f"epoch {epoch} val accuracy {a:.3f} / {b:.3f}")


if __name__ == "__main__":
    main()
