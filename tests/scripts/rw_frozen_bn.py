"""Fine-tuning with BatchNorm kept in eval mode (detection style): model.train(), then every BatchNorm .eval().

--affine frozen: the BatchNorm weight and bias are frozen too (requires_grad_(False)), as FrozenBatchNorm does.
--affine train: the weight and bias still train while the statistics stay fixed (mmdetection's norm_eval=True
with requires_grad=True)."""

import argparse

import torch
from digits import BNMLP, loaders
from rw_common import evaluate
from torch import nn


def set_train(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--affine", choices=["frozen", "train"], default="frozen")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=32)
    model = BNMLP()
    with torch.no_grad():  # "pretrained" statistics: a pass over the training data in train mode
        model.train()
        for x, _ in train:
            model(x)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and args.affine == "frozen":
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01)
    step = 0
    while step < args.steps:
        set_train(model)
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == args.steps:
                break
        print(f"val accuracy {evaluate(model, val):.3f}")


if __name__ == "__main__":
    main()
