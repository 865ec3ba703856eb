"""Mixed precision on CPU (torch.autocast bfloat16) with a OneCycle learning-rate schedule stepped per batch,
and a cosine schedule on a second run (--sched cosine), validated under autocast too."""

import argparse

import torch
from digits import BNMLP, loaders
from rw_common import evaluate
from torch import nn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sched", choices=["onecycle", "cosine"], default="onecycle")
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=64)
    model = BNMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    if args.sched == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.epochs * len(train))
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(train))
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
        print(f"val accuracy {evaluate(model, val, autocast=True):.3f}")


if __name__ == "__main__":
    main()
