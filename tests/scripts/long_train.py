"""Trains until it is interrupted (Ctrl-C), printing each step."""

import time

import torch
from digits import BNMLP, loaders
from torch import nn


def main():
    train, _ = loaders(64)
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    while True:
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            print(f"step {step}", flush=True)
            time.sleep(0.05)


if __name__ == "__main__":
    main()
