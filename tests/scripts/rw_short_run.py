"""A short run of a correct model: one epoch cut to a few steps (a smoke test), a convolutional net on the
digits as 8x8 images, then one validation pass."""

import argparse

import torch
from digits import loaders
from rw_common import evaluate
from torch import nn


def as_images(x):
    return x.view(-1, 1, 8, 8)


def make_model():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=32)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i, (x, y) in enumerate(train):
        if i == args.steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(as_images(x)), y).backward()
        opt.step()
    print(f"val accuracy {evaluate(model, val, prepare=as_images):.3f}")


if __name__ == "__main__":
    main()
