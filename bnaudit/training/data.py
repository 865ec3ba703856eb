"""Training data for train-compare: everything the user can pass as ``data`` becomes two in-memory tensors.

A controlled comparison needs every variant to see the same examples in the same order, and a batch-size
sweep needs to re-batch the same examples; both are simplest and exact when the (small) dataset is held as
one inputs tensor and one targets tensor. This module turns an ``(inputs, targets)`` pair, a map-style
Dataset, a DataLoader or any iterable of ``(inputs, targets)`` batches, or a bnaudit DataSource into that
pair, carves out a validation split when none is given, and draws the per-seed batch order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bnaudit.errors import BnauditError, DataError
from bnaudit.usercode import describe, user_frame


@dataclass(frozen=True)
class TensorData:
    """A dataset held in memory: ``inputs[i]`` goes with ``targets[i]``."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor) -> TensorData:
        return TensorData(self.inputs[index], self.targets[index])


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
    except ImportError:  # numpy is a dependency, but a clear error beats an ImportError here
        pass
    raise DataError(
        f"train-compare needs tensor {what}, got {type(value).__name__}; give (inputs, targets) tensors or arrays"
    )


def _from_batches(batches: Any) -> TensorData:
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for batch in batches:
        if hasattr(batch, "inputs") and hasattr(batch, "targets"):
            x, y = batch.inputs, batch.targets
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:
            raise DataError(
                "train-compare needs batches of (inputs, targets); got a batch of type "
                f"{type(batch).__name__}. Give data that yields (inputs, targets) pairs"
            )
        if y is None:
            raise DataError("train-compare needs targets: the data yields inputs only; give (inputs, targets)")
        xs.append(_as_tensor(x, "inputs").cpu())
        ys.append(_as_tensor(y, "targets").cpu())
    if not xs:
        raise DataError("the training data is empty; give at least a few (inputs, targets) examples")
    try:
        return TensorData(torch.cat(xs), torch.cat(ys))
    except RuntimeError as exc:
        raise DataError(f"batches of the training data do not stack into one tensor: {exc}") from None


def _item_batch(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One dataset item ``(x, y)`` as a batch of one."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError("train-compare needs targets: the dataset yields inputs only; give (inputs, targets) items")
    x, y = item
    return _as_tensor(x, "inputs").unsqueeze(0), torch.as_tensor(y).unsqueeze(0)


def _is_tensor_dataset(obj: Any) -> bool:
    from torch.utils.data import TensorDataset

    return isinstance(obj, TensorDataset) and len(obj.tensors) == 2


def _dataset_of(data: Any) -> Any:
    """The map-style dataset behind a DataLoader or a DataSource over one, else None."""
    from torch.utils.data import DataLoader, IterableDataset

    loader = data if isinstance(data, DataLoader) else getattr(data, "origin", None)
    if not isinstance(loader, DataLoader) or getattr(data, "input_key", None):
        return None
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return None
    return dataset


def as_tensor_data(data: Any) -> TensorData:
    """Turn what the user passed as ``data`` into a :class:`TensorData` on the CPU.

    An exception raised by the user's data code while it is read (a Dataset's ``__getitem__``, a generator)
    becomes a DataError naming the file and line.

    Args:
        data: an ``(inputs, targets)`` pair of tensors or numpy arrays; a map-style Dataset returning
            ``(x, y)``; a DataLoader or other iterable of ``(inputs, targets)`` batches; or a bnaudit
            DataSource (anything with ``.batches()`` yielding objects with ``inputs``/``targets``).

    Returns:
        The whole dataset in memory.

    Raises:
        DataError: no targets, non-tensor inputs, empty data, inputs and targets of different lengths, or the
            user's data code raised.
    """
    try:
        return _read(data)
    except BnauditError:
        raise
    except Exception as exc:
        where = user_frame(exc.__traceback__)
        raise DataError(
            f"reading the training data raised {describe(exc)}{f' at {where}' if where else ''}; fix the data "
            "code or rerun with --debug"
        ) from exc


def _read(data: Any) -> TensorData:
    dataset = _dataset_of(data)
    if isinstance(data, TensorData):
        out = data
    elif dataset is not None:
        # A loader over a map-style dataset: read the dataset in index order, so the split and the batches
        # do not depend on the loader's own shuffling (train-compare draws its own order from each seed).
        out = _read(dataset)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        out = TensorData(_as_tensor(data[0], "inputs").cpu(), _as_tensor(data[1], "targets").cpu())
    elif hasattr(data, "batches") and callable(data.batches):
        out = _from_batches(data.batches())
    elif _is_tensor_dataset(data):
        out = TensorData(data.tensors[0].detach().cpu(), data.tensors[1].detach().cpu())
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
        # A map-style Dataset (TensorDataset, a user's Dataset): read every item once.
        out = _from_batches(_item_batch(data[i]) for i in range(len(data)))
    elif hasattr(data, "__iter__"):
        out = _from_batches(iter(data))
    else:
        raise DataError(
            f"train-compare cannot read data of type {type(data).__name__}; give (inputs, targets) tensors, "
            "a Dataset, a DataLoader or a --data spec"
        )
    if out.inputs.shape[0] != out.targets.shape[0]:
        raise DataError(
            f"inputs have {out.inputs.shape[0]} examples but targets have {out.targets.shape[0]}; "
            "give one target per input"
        )
    if len(out) == 0:
        raise DataError("the training data is empty; give at least a few (inputs, targets) examples")
    return out


def match_dtype(data: TensorData, dtype: torch.dtype | None) -> TensorData:
    """Floating inputs cast to the model's parameter dtype (float64 numpy arrays meet float32 weights);
    integer inputs (token ids) are left alone."""
    if dtype is None or not data.inputs.is_floating_point() or data.inputs.dtype == dtype:
        return data
    return TensorData(data.inputs.to(dtype), data.targets)


def split_validation(data: TensorData, fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """Carve a validation split out of ``data``, the same for every run (drawn from ``seed``).

    Raises:
        DataError: the fraction leaves no training or no validation examples.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {fraction}")
    n = len(data)
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 2:
        raise DataError(
            f"cannot carve a {fraction:.0%} validation split out of {n} examples; give more data or --val-data"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return data.subset(perm[n_val:]), data.subset(perm[:n_val])


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Index tensors for ``steps`` mini-batches: shuffled epochs drawn from ``seed``, last partial batch of an
    epoch dropped (a one-example batch would break BatchNorm and is not what the user asked for).

    The order depends only on (n, batch_size, seed), so every variant and learning rate of one seed sees
    identical batches in identical order.
    """
    if batch_size > n:
        raise DataError(f"batch size {batch_size} is larger than the {n} training examples; use a smaller one")
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for b in range(per_epoch):
            if done >= steps:
                return
            yield perm[b * batch_size : (b + 1) * batch_size]
            done += 1


def eval_batches(data: TensorData, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-order batches for evaluation (batch size only bounds memory; eval mode makes it irrelevant)."""
    for start in range(0, len(data), batch_size):
        yield data.inputs[start : start + batch_size], data.targets[start : start + batch_size]
