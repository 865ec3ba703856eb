"""The BatchNorm MLP with an evaluation loop that forgets model.eval(): every validation batch updates the
running statistics (BN306)."""

import argparse

import torch
from digits import BNMLP, loaders
from torch import nn


def validate(model, loader):
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)  # BN306: still in train mode
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = loaders(64)
    model = BNMLP()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr / 10)
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        for inputs, targets in train:
            opt.zero_grad()
            criterion(model(inputs), targets).backward()
            opt.step()
        acc = validate(model, val)
        print(f"epoch {epoch} accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
