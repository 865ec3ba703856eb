"""Data-parallel training on 2 CPU processes (gloo), as launched by torchrun: each rank trains a
DistributedDataParallel copy of the BatchNorm MLP on its own shard of sklearn digits."""

import argparse

import torch
import torch.distributed as dist
from digits import BNMLP, loaders
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dataset = loaders(32)[0].dataset
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)
    model = DistributedDataParallel(BNMLP())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, y) in enumerate(loader):
        if step == args.steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    print(f"rank {dist.get_rank()} done")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
