"""A batch-size sweep on the digits: BatchNorm degrades with tiny batches, GroupNorm does not (Wu & He 2018).

The base model is an MLP without normalization (64 -> 256 -> 256 -> 10, ReLU). train-compare builds the "bn"
variant with ``bnaudit.insert_bn`` (BatchNorm1d after each hidden Linear) and the "groupnorm" variant by
swapping those BatchNorms for GroupNorm (``bnaudit.swap_norm``: 32 groups of 8 features). With a batch of 2,
BatchNorm1d normalizes every feature over two examples (each becomes ±1 in training) and evaluates with
running statistics gathered from such batches; GroupNorm normalizes each example on its own, so its
behaviour does not depend on the batch size. Every run takes the same number of Adam steps.

    bnaudit train-compare examples/batch_size_sweep.py --variants bn,groupnorm --batch-size 2,4,64 \
        --optimizer adam --lr 0.001 --steps 400 --plot plots/batch_sweep
    python examples/batch_size_sweep.py
"""

from __future__ import annotations

import torch
from bundled_data import arrays
from torch import nn

BATCH_SIZES = (2, 4, 64)


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def build_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: standardized 64-pixel features and integer labels (train-compare splits off 20%)."""
    return arrays("digits")


if __name__ == "__main__":
    from bnaudit.training import train_compare

    result = train_compare(
        build_model(),
        build_data(),
        variants=("bn", "groupnorm"),
        batch_sizes=BATCH_SIZES,
        optimizer="adam",
        lrs=(0.001,),
        steps=400,
    )
    print("\n".join(result.verdict))
