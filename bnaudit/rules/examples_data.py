"""Example factories of the BN2xx rules (what the data does to normalization): small, seeded models,
datasets and loaders, and a recorded training run, shared by the rules' ``valid``/``invalid`` cases and their
tests."""

from __future__ import annotations

import torch
from torch import nn

from bnaudit.rules.examples import digits, seeded, train_steps


def standardized(n: int = 256, f: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, f, generator=seeded())
    return x, (x[:, 0] > 0).long()


def age_income(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded()
    age = 40 + 12 * torch.randn(n, generator=g)
    income = 60_000 + 25_000 * torch.randn(n, generator=g)
    x = torch.stack([age, income], dim=1)
    return x, (income > 60_000).long()


def mlp_bn(f: int = 4, hidden: int = 16, classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(f, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes))


def mlp(f: int = 4, hidden: int = 16, classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def odd_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    # 65 samples at the default batch size 32: the last batch holds one sample.
    x = torch.randn(65, 4, generator=seeded())
    return x, (x[:, 0] > 0).long()


def even_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 4, generator=seeded())
    return x, (x[:, 0] > 0).long()


def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = seeded()
    return [(torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(8)]


def mean_noise_batches(ratio: float, batches: int = 8, size: int = 16, f: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """Batches whose per-channel batch means spread by exactly ``ratio`` population stds (BN203's statistic).

    Each batch is its mean plus and minus ``sqrt(1 - ratio**2)`` in equal halves, and the batch means are
    ``ratio`` times standardized draws, so std over batches / population std = ``ratio`` in every channel."""
    g = seeded()
    z = torch.randn(batches, f, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    half = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat_interleave(size // 2)
    out = []
    for b in range(batches):
        x = ratio * z[b] + (1 - ratio**2) ** 0.5 * half[torch.randperm(size, generator=g)][:, None]
        out.append((x.float(), torch.randint(0, 2, (size,), generator=g)))
    return out


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))


def small_image_batches() -> list[torch.Tensor]:
    # 4 images of 2x2 per batch: 4 samples alone would be too few, 4 x 2 x 2 = 16 values per channel are not.
    g = seeded()
    return [torch.randn(4, 3, 2, 2, generator=g) for _ in range(4)]


def sorted_loader():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(320, 4, generator=seeded())
    y = torch.arange(320) // 32  # 10 classes, sorted
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def shuffled_loader():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(320, 4, generator=seeded())
    y = torch.arange(320) // 32
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=seeded(1))


class PaddedSeq(nn.Module):
    """Embeds tokens (0 = padding) and normalizes the (N, C, L) sequence with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.emb(tokens).transpose(1, 2))
        return self.head(h.mean(2))


def padded_tokens(pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded()
    tokens = torch.randint(1, 20, (64, 12), generator=g)
    if pad:
        lengths = torch.randint(2, 5, (64,), generator=g)
        tokens[torch.arange(12)[None, :] >= lengths[:, None]] = 0
    return tokens, torch.randint(0, 2, (64,), generator=g)


def deep(act: type[nn.Module], scale: float, depth: int = 10, width: int = 32, bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            nn.init.normal_(lin.weight, std=scale / width**0.5)
            lin.bias.zero_()
        layers += [lin, *( [nn.BatchNorm1d(width)] if bn else [] ), act()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def wide_x() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(128, 32, generator=seeded())
    return x, (x[:, 0] > 0).long()


def dead_relu() -> nn.Module:
    m = mlp(4, 16)
    with torch.no_grad():
        m[0].bias.fill_(-100.0)
    return m


def saturated_sigmoid() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 16), nn.Sigmoid(), nn.Linear(16, 2))
    with torch.no_grad():
        m[0].weight.mul_(100.0)
    return m


def healthy_sigmoid() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Sigmoid(), nn.Linear(16, 2))


def nan_buffer() -> nn.Module:
    m = mlp_bn()
    m[1].running_var[3] = float("nan")
    return m


def inf_weight() -> nn.Module:
    m = mlp()
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    return m


def history(lr: float, steps: int = 30) -> dict:
    """Train a small sigmoid MLP on digits under bnaudit.record and hand its History to inspect."""
    from bnaudit.recording import record

    torch.manual_seed(0)
    x, y = digits(256)
    model = nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = seeded()
    with record(model) as rec:
        train_steps(model, opt, x, y, steps, g, after_step=lambda _: rec.step())
    return {"history": rec.history}


def digits_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 10))
