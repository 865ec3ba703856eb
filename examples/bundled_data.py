"""Real data for the examples: scikit-learn's bundled datasets (no download), as DataLoaders.

``digits``: 1,797 8×8 handwritten digits, 10 classes. ``wine``: 178 wines, 13 chemical measurements on
very different scales, 3 classes. Features are standardized unless ``standardize=False``."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def _load(name: str):
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - the extra is documented in the README
        raise ImportError("the examples need scikit-learn: pip install 'bnaudit[datasets]'") from exc
    return {"digits": datasets.load_digits, "wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer}[name]()


def arrays(name: str, *, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32) and integer labels of a bundled dataset."""
    bunch = _load(name)
    x = np.asarray(bunch.data, dtype=np.float64)
    if standardize:
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)


def loader(name: str, *, batch_size: int = 64, standardize: bool = True, image: bool = False, seed: int = 0) -> DataLoader:
    """A shuffled DataLoader over a bundled dataset; ``image=True`` gives digits as (N, 1, 8, 8)."""
    x, y = arrays(name, standardize=standardize)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
