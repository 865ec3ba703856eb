"""Gradient accumulation: micro-batches of 16, one optimizer step every 4 of them (an effective batch of 64),
validation once an epoch under model.eval() + torch.no_grad()."""

import argparse

import torch
from digits import BNMLP, loaders
from rw_common import evaluate
from torch import nn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--accum", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=16, drop_last=True)
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.epochs):
        model.train()
        opt.zero_grad()
        for i, (x, y) in enumerate(train):
            loss = nn.functional.cross_entropy(model(x), y) / args.accum
            loss.backward()
            if (i + 1) % args.accum == 0:
                opt.step()
                opt.zero_grad()
        print(f"val accuracy {evaluate(model, val):.3f}")


if __name__ == "__main__":
    main()
