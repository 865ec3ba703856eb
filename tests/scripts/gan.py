"""A small GAN on sklearn digits: a Generator and a Discriminator, each with BatchNorm and its own optimizer."""

import argparse

import torch
from digits import loaders
from torch import nn


class Generator(nn.Module):
    def __init__(self, z=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(z, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 64))

    def forward(self, z):
        return self.body(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-grad-fake", action="store_true", help="make the discriminator's fake batch under no_grad")
    args = ap.parse_args()
    torch.manual_seed(0)
    train, _ = loaders(32)
    gen, disc = Generator(), Discriminator()
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    for step, (real, _) in enumerate(train):
        if step >= args.steps:
            break
        z = torch.randn(len(real), 16)
        if args.no_grad_fake:  # a common recipe: the generator in train mode, autograd off for D's batch
            with torch.no_grad():
                fake_d = gen(z)
            fake = gen(z)
        else:
            fake = gen(z)
            fake_d = fake.detach()
        opt_d.zero_grad()
        d_loss = bce(disc(real), torch.ones(len(real), 1)) + bce(disc(fake_d), torch.zeros(len(real), 1))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = bce(disc(fake), torch.ones(len(real), 1))
        g_loss.backward()
        opt_g.step()
    print(f"d_loss {d_loss.item():.3f} g_loss {g_loss.item():.3f}")


if __name__ == "__main__":
    main()
