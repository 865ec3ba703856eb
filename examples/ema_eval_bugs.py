"""Two eval-mode mistakes the BN3xx probes catch, in a script shaped like many real ones.

``build_model`` trains an MLP on the digits for a moment and returns an exponential moving average of its
weights taken over ``parameters()`` only, so the BatchNorm buffers of the average are never estimated
(BN303). ``predict`` forgets ``model.eval()``: a sample's prediction depends on its batch (BN301) and every
call moves the running statistics (BN306). ``predict_fixed`` is the repaired inference function.

    bnaudit inspect examples/ema_eval_bugs.py --select BN3
    bnaudit recalibrate examples/ema_eval_bugs.py -o ema_recalibrated.pt
    bnaudit inspect ema_recalibrated.pt --data examples/ema_eval_bugs.py:build_data \\
        --predict examples/ema_eval_bugs.py:predict_fixed --select BN3
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bundled_data import arrays


def build_data() -> tuple[torch.Tensor, torch.Tensor]:
    return arrays("digits")


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    ema = copy.deepcopy(model)
    x, y = build_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the average skips buffers(): its running statistics stay at their initial values
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 0.1)
    return ema


def predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # but no model.eval()
        return model(inputs).softmax(dim=1)


def predict_fixed(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs).softmax(dim=1)
