"""Example factories of the BN4xx rules (BatchNorm under data-parallel training): small models with plain,
synchronized and hand-written BatchNorm layers, and a model trained under DDP on label-sorted shards."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnaudit.distributed import dist_info
from bnaudit.rules.examples import digits, train_steps


def batch(n: int = 32, features: int = 10) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(0))


def mlp(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 8, bias=False), norm, nn.ReLU(), nn.Linear(8, 2))


class _CustomBN(nn.Module):
    """A hand-written BatchNorm (not a torch _BatchNorm subclass): convert_sync_batchnorm skips it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training)


def mixed_sync() -> nn.Module:
    """Backbone converted to SyncBatchNorm, head added afterwards with a plain BatchNorm1d."""
    backbone = nn.SyncBatchNorm.convert_sync_batchnorm(mlp(nn.BatchNorm1d(8))[:3])
    return nn.Sequential(backbone, nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def mixed_custom() -> nn.Module:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(mlp(nn.BatchNorm1d(8)))
    return nn.Sequential(model[0], model[1], nn.ReLU(), nn.Linear(8, 6, bias=False), _CustomBN(6), nn.Linear(6, 2))


def shard_trained(sync_buffers: bool) -> nn.Module:
    """Every rank trains the same init under DDP on its own shard of a dataset sorted by label (the first
    ranks see digits 0-4, the last 5-9), with buffer broadcasting off (``sync_buffers=False``) or on."""
    import torch.distributed as dist

    info = dist_info()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    x, y = digits()
    order = np.argsort(y.numpy(), kind="stable")
    shard = torch.from_numpy(np.array_split(order, info.world_size)[info.rank])
    xs, ys = x[shard], y[shard]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=sync_buffers) if info.active else model
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(info.rank)
    # 40 steps: long enough for each rank's running statistics to approach its own shard's.
    train_steps(net, opt, xs, ys, 40, g, batch=32)
    if info.active:
        dist.barrier()
    return model


def digits_batch() -> torch.Tensor:
    return torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
