"""Example factories of the BN3xx rules (eval mode and running statistics): small models trained for a moment
on scikit-learn's digits, built the way users write them, cached and copied so every case gets a fresh one.
The rules' ``valid``/``invalid`` examples and their tests use them."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from bnaudit.layers import is_batchnorm
from bnaudit.rules.examples import digits, digits_tensors, train_steps


def shifted_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The same digits as a different camera would give them: brighter and with more contrast."""
    x, y = digits()
    return x * 2.5 + 0.5, y


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def _train(model: nn.Module, steps: int = 120, *, seed: int = 0) -> nn.Module:
    """A user's training loop: shuffled minibatches of 64, Adam, cross-entropy."""
    x, y = digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    train_steps(model, opt, x, y, steps, gen)
    return model


@functools.lru_cache(maxsize=1)
def _trained_mlp_cached() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _train(_mlp())


def trained_mlp() -> nn.Module:
    """An MLP with BatchNorm trained on digits; left in train mode, as after its training loop."""
    return copy.deepcopy(_trained_mlp_cached())


@functools.lru_cache(maxsize=1)
def _trained_cnn_cached() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
        return _train(model)


def trained_cnn() -> nn.Module:
    """A CNN with BatchNorm2d trained on the digits as 1x8x8 images, left in train mode after training. In
    train mode a batch of one sample still runs (64 values per channel), so only the comparison of
    co-batches shows that its predictions depend on the batch."""
    return copy.deepcopy(_trained_cnn_cached())


def _ema_update(ema: nn.Module, model: nn.Module, decay: float = 0.9) -> None:
    """A hand-written EMA over ``parameters()`` only, as often seen in training scripts: the buffers of the
    EMA copy are never touched."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)


@functools.lru_cache(maxsize=1)
def _ema_cached() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _mlp()
        ema = copy.deepcopy(model)  # made before training: its buffers are a fresh layer's 0 / 1
        x, y = digits_tensors()
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_steps(model, opt, x, y, 120, gen, after_step=lambda _: _ema_update(ema, model))
        return ema


def ema_params_only() -> nn.Module:
    """EMA weights whose BatchNorm buffers were never estimated (still running_mean=0, running_var=1)."""
    return copy.deepcopy(_ema_cached())


def ema_with_update_bn() -> nn.Module:
    """The corrected twin: ``torch.optim.swa_utils.update_bn`` run on the training data after averaging."""
    from torch.optim.swa_utils import update_bn
    from torch.utils.data import DataLoader, TensorDataset

    ema = copy.deepcopy(_ema_cached())
    x, _ = digits_tensors()
    update_bn(DataLoader(TensorDataset(x), batch_size=64), ema)
    return ema


def untrained_mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _mlp()


def zero_init_last_mlp() -> nn.Module:
    """A fresh MLP whose last BatchNorm starts at gamma = 0, as torchvision's ``zero_init_residual`` and timm's
    ``zero_init_last`` set the last BatchNorm of each residual branch: weights that differ from 1 by design."""
    model = untrained_mlp()
    nn.init.zeros_(model[4].weight)
    return model


def dcgan_init_mlp() -> nn.Module:
    """A fresh MLP initialised as DCGAN-style code does: BatchNorm gamma drawn from N(1, 0.02), beta 0."""
    model = untrained_mlp()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=gen))
            nn.init.zeros_(m.bias)
    return model


def untracked_mlp() -> nn.Module:
    """BatchNorm built with ``track_running_stats=False``: batch statistics in eval mode too."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(), nn.Linear(32, 10)
        )
        return _train(model, steps=60)


class _FineTune(nn.Module):
    """A pretrained backbone, frozen, under a new trainable head: the classic fine-tuning set-up."""

    def __init__(self, backbone: nn.Module, keep_frozen_bn_eval: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(32, 10)
        self.keep_frozen_bn_eval = keep_frozen_bn_eval
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FineTune:
        super().train(mode)
        if self.keep_frozen_bn_eval:
            # The fix: frozen BatchNorm layers normalize with their pretrained statistics, always.
            for m in self.backbone.modules():
                if is_batchnorm(m):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _finetune(keep_frozen_bn_eval: bool) -> nn.Module:
    backbone = nn.Sequential(*list(trained_mlp().children())[:-1])  # drop the old head
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = _FineTune(backbone, keep_frozen_bn_eval)
    return model.train()


def frozen_backbone() -> nn.Module:
    return _finetune(False)


def frozen_backbone_kept_eval() -> nn.Module:
    return _finetune(True)


def deployed() -> nn.Module:
    """An inference-only copy, as a serving script loads one: ``model.requires_grad_(False)`` and
    ``model.eval()`` once, right after loading."""
    model = trained_mlp()
    model.requires_grad_(False)
    return model.eval()


@functools.lru_cache(maxsize=2)
def _recorded_run(switch_back: bool) -> tuple[nn.Module, Any]:
    """A user's loop recorded with ``bnaudit.record``: 40 steps, with a validation pass after step 15 that
    calls ``model.eval()``; only the corrected loop calls ``model.train()`` afterwards."""
    from bnaudit.recording import record

    x, y = digits_tensors()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        model.train()
        with record(model, per_channel=False) as rec:

            def after_step(step: int) -> None:
                if step == 15:
                    model.eval()
                    with torch.no_grad():
                        model(x[:256])  # mid-epoch validation
                    if switch_back:
                        model.train()
                rec.step()

            train_steps(model, opt, x, y, 40, gen, after_step=after_step)
        return model, rec.history


def left_in_eval() -> nn.Module:
    return copy.deepcopy(_recorded_run(False)[0])


def left_in_eval_history() -> dict[str, Any]:
    return {"history": _recorded_run(False)[1]}


def switched_back() -> nn.Module:
    return copy.deepcopy(_recorded_run(True)[0])


def switched_back_history() -> dict[str, Any]:
    return {"history": _recorded_run(True)[1]}


def predict_no_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A predict() as often written: no_grad, but never model.eval()."""
    with torch.no_grad():
        return model(x).softmax(dim=1)


def predict_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The corrected predict(): eval mode first."""
    model.eval()
    with torch.no_grad():
        return model(x).softmax(dim=1)
