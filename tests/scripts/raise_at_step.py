"""Trains a few steps, then fails at step 5 the way a real bug does: an exception from the user's own code."""

import argparse

import torch
from digits import BNMLP, loaders
from torch import nn


def check_batch(step):
    if step == 5:
        raise RuntimeError(f"corrupt batch at step {step}")  # the script's own error


def main():
    ap = argparse.ArgumentParser()
    ap.parse_args()
    torch.manual_seed(0)
    train, _ = loaders(64)
    model = BNMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, y) in enumerate(train):
        check_batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


if __name__ == "__main__":
    main()
