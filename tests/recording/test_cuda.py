"""The recorder on a GPU: a recorded training step never synchronises with the host (no ``.item()``,
``.cpu()`` or blocking copy per module or per step), and its rows equal the CPU recorder's on the same
values. Skipped without CUDA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.recording import record

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.BatchNorm1d(16), nn.Sigmoid(), nn.Linear(16, 4))


@cuda
def test_recorded_training_steps_never_sync_and_match_the_cpu():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)]
    histories = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(_model()).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = [(x.to(device), y.to(device)) for x, y in batches]
        torch.cuda.synchronize()
        with record(model, units={"6": [0, 3]}) as rec:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                for x, y in data:
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    rec.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        histories[device] = rec.history
    cpu, gpu = histories["cpu"], histories["cuda"]
    assert cpu.layers == gpu.layers and len(gpu) == 4
    for layer in cpu.layers:
        for stat in ("channel_mean", "channel_var", "min", "max", "zero_frac", "nonfinite_frac", "count"):
            np.testing.assert_allclose(gpu.series(layer, stat), cpu.series(layer, stat), rtol=1e-3, atol=1e-4,
                                       err_msg=f"{layer} {stat}")
    np.testing.assert_allclose(gpu.series("1", "running_var"), cpu.series("1", "running_var"), rtol=1e-3, atol=1e-5)
