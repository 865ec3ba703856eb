"""Stochastic weight averaging with torch.optim.swa_utils: an AveragedModel from the last epochs, its BatchNorm
statistics recomputed by update_bn at the end; with --precise-bn the trained model's own statistics are also
re-estimated by update_bn before each validation ("precise BN", as detectron2's PreciseBN hook does)."""

import argparse

import torch
from digits import loaders
from rw_common import evaluate
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn


class Net(nn.Module):
    """The PyTorch MNIST example's shape: dropout, and log-probabilities out for nll_loss."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, 48), nn.BatchNorm1d(48)
        self.fc2, self.drop = nn.Linear(48, 10), nn.Dropout(0.25)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.fc1(x))))
        return nn.functional.log_softmax(self.fc2(x), dim=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--precise-bn", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=64)
    model = Net()
    swa_model = AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    swa_sched = SWALR(opt, swa_lr=0.02, anneal_epochs=1)
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.nll_loss(model(x), y).backward()
            opt.step()
        if epoch >= 1:
            swa_model.update_parameters(model)
            swa_sched.step()
        if args.precise_bn:
            update_bn(train, model)
        print(f"val accuracy {evaluate(model, val):.3f}")
    update_bn(train, swa_model)
    print(f"swa val accuracy {evaluate(swa_model, val):.3f}")


if __name__ == "__main__":
    main()
