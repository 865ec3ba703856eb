"""Validation every few steps calls model.eval() and never switches back: the rest of training runs with
BatchNorm in eval mode (BN307)."""

import argparse

import torch
import torch.nn.functional as F
from digits import BNMLP, loaders


@torch.no_grad()
def val_loss(model, loader):
    model.eval()
    return sum(F.cross_entropy(model(x), y).item() for x, y in loader)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--val-every", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = loaders(64)
    model = BNMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    while step < args.steps:
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # BN307: after the first validation this runs in eval mode
            step += 1
            if step % args.val_every == 0:
                print(f"step {step}: val loss {val_loss(model, val):.3f}")
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
