"""Example factories of the BN1xx rules (how normalization is wired): small, seeded models and inputs,
including shrunk copies of architectures found in the wild, shared by the rules' ``valid``/``invalid`` cases
and their tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def x(features: int = 10, n: int = 16) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(0))


def img(channels: int = 3, n: int = 8, size: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def mlp(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers)


class TokenMLP(nn.Module):
    """Linear on (N, L, C) tokens, then BatchNorm1d(L): normalizes across positions, not features."""

    def __init__(self, transpose: bool = False) -> None:
        super().__init__()
        self.transpose = transpose
        self.proj = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16 if transpose else 6)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (N, L=6, C=16)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2) if self.transpose else self.bn(h)
        return self.head(h.mean(1))


def tokens() -> torch.Tensor:
    return torch.randn(8, 6, 12, generator=torch.Generator().manual_seed(0))


class SharedBN(nn.Module):
    """One BatchNorm applied at every step of a loop (as in a hand-written RNN)."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.cell = nn.Linear(10, 10, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm1d(10) for _ in range(1 if shared else 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for t in range(3):
            h = torch.tanh(self.bns[0 if len(self.bns) == 1 else t](self.cell(h)))
        return h


class RmsNorm(nn.Module):
    """RMS normalization over the last axis as a third-party library writes it (timm's RmsNorm): not a torch
    class, known by its name."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BatchVarianceScale(nn.Module):
    """An EvoNorm-B0-like layer under another name: divides by the batch standard deviation in training and
    by a running one in eval mode; known as a normalization layer by its ``running_var`` buffer."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-3) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_var.lerp_(var, self.momentum)
        else:
            var = self.running_var
        return x / (var + self.eps).sqrt() * self.weight + self.bias


class NormedBlock(nn.Module):
    """A block that normalizes inside its own forward (``F.layer_norm``), as attention blocks often do: not a
    normalization layer itself, since it holds a Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(self.fc(x), (self.dim,))


class TwoBranches(nn.Module):
    """One Dropout feeding two branches, each with its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(10, 8)
        self.drop = nn.Dropout(0.3)
        self.a, self.bn_a = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)
        self.b, self.bn_b = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.stem(x)))
        return self.head(torch.cat([torch.relu(self.bn_a(self.a(h))), torch.relu(self.bn_b(self.b(h)))], dim=1))


class BiasedAttention(nn.Module):
    """Token mixing by attention whose logits get a learned bias from a small MLP with dropout (MaxViT's and
    CoAtNet's relative-position MLP), then a BatchNorm over the features of the mixed tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(12, 36)
        self.bias_mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.125), nn.Linear(8, 1))
        self.register_buffer("distance", (torch.arange(6.0)[:, None] - torch.arange(6.0)[None, :]).abs()[..., None])
        self.proj = nn.Linear(12, 12, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(1, 2) + self.bias_mlp(self.distance).squeeze(-1)).softmax(dim=-1)
        h = self.proj(attn @ v)  # (N, L, C)
        return self.head(torch.relu(self.bn(h.transpose(1, 2))).mean(2))


def deep(norm: type[nn.Module] | None) -> nn.Module:
    """Four hidden Linear layers with ReLUs, each normalized by ``norm`` when given."""
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(10, 10, bias=norm is None), *([norm(10)] if norm else []), nn.ReLU()]
    return mlp(*layers, nn.Linear(10, 2))


class BiasTo(nn.Module):
    """A Linear feeding a BatchNorm, plus a residual add of its output or a functional relu in between."""

    def __init__(self, residual: bool = False, activation: bool = False, flatten: bool = False) -> None:
        super().__init__()
        self.residual, self.activation, self.flatten = residual, activation, flatten
        self.fc = nn.Linear(10, 10)
        self.bn = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation:
            out = self.bn(torch.nn.functional.relu(h))
        elif self.flatten:
            out = self.bn(h.flatten(1))
        else:
            out = self.bn(h)
        if self.residual:
            out = out + h  # the bias also reaches the output through the skip: it is not cancelled
        return self.head(out)


def half_bn(eps: float) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, eps=eps), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)



class GanGenerator(nn.Module):
    """The MLP generator of eriklindernoren/PyTorch-GAN's gan.py, shrunk: ``BatchNorm1d(out_feat, 0.8)`` is
    Keras's ``BatchNormalization(momentum=0.8)`` ported positionally, so 0.8 lands on eps."""

    def __init__(self, latent: int = 10, keras_port: bool = True, eps: float | None = None) -> None:
        super().__init__()

        def block(in_feat: int, out_feat: int, normalize: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(in_feat, out_feat)]
            if normalize:
                if eps is not None:
                    layers.append(nn.BatchNorm1d(out_feat, eps=eps))
                elif keras_port:
                    layers.append(nn.BatchNorm1d(out_feat, 0.8))
                else:
                    layers.append(nn.BatchNorm1d(out_feat, momentum=0.2))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(
            *block(latent, 16, normalize=False), *block(16, 32), nn.Linear(32, 8), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


def efficientnet_block(eps: float = 1e-3) -> nn.Module:
    # timm's EfficientNets: Conv -> BatchNorm2d(eps=1e-3) -> SiLU (Keras's default eps, on purpose).
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=eps), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


class MorvanNet(nn.Module):
    """MorvanZhou's BatchNorm tutorial net (tutorial-contents/504_batch_normalization.py), shrunk: both the
    "with BN" and "without BN" nets build ``bn_input``; only the first calls it."""

    def __init__(self, do_bn: bool = False, hidden: int = 5) -> None:
        super().__init__()
        self.do_bn = do_bn
        self.bn_input = nn.BatchNorm1d(1, momentum=0.5)
        self.fcs = []
        for i in range(hidden):
            fc = nn.Linear(1 if i == 0 else 10, 10)
            setattr(self, f"fc{i}", fc)
            self.fcs.append(fc)
        self.predict = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.do_bn:
            x = self.bn_input(x)
        for fc in self.fcs:
            x = torch.tanh(fc(x))
        return self.predict(x)


class BranchBN(nn.Module):
    """Normalizes only when the batch is not constant: a data-dependent branch (fx cannot trace it), taken on
    any real input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.std() > 0:
            h = self.bn(h)
        return self.head(torch.relu(h))


def scalar_x() -> torch.Tensor:
    return torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
