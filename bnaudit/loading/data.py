"""Loading the data to audit with: whatever a ``--data`` spec yields, turned into a re-iterable source of
``Batch(inputs, targets)`` plus what the loader says about itself (batch size, dataset length, drop_last,
shuffling), which the batch rules need.

Accepted: a DataLoader, a Dataset, a tensor, an ``(inputs, targets)`` pair, an iterable of batches (a
one-shot generator is cached as it is read), ``random:SHAPE``, and ``.pt`` / ``.npz`` / ``.csv`` array files.
A batch may be a tensor, a tuple/list (first element = inputs, second = targets) or a dict (``input_key``)."""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from bnaudit import usercode
from bnaudit.errors import DataError, SpecError
from bnaudit.limits import BATCH_SHARE, check_allocation
from bnaudit.loading.specs import describe_exception, import_target, lookup, missing_file, parse_py_spec

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "input_ids", "features", "data")
TARGET_KEYS = ("target", "targets", "label", "labels", "y")
ARRAY_SUFFIXES = (".pt", ".pth", ".npz", ".csv")
_CACHE_LIMIT = 256  # batches kept from a one-shot iterator


def move_to(value: Any, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in ``value`` (nested tuples, lists and dicts too) to ``device`` when given, casting
    floating tensors to ``dtype`` when given; anything else passes through."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        return value.to(device) if device is not None else value
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device, dtype) for k, v in value.items()}
    return value


def non_finite_at(value: Any) -> tuple[int, ...] | None:
    """The index of the first NaN or Inf in the floating tensors of ``value`` (nested tuples, lists and dicts
    too), or None when every value is finite."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()):
            return None
        bad = ~torch.isfinite(value)
        return tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        found = non_finite_at(item)
        if found is not None:
            return found
    return None


@dataclass
class Batch:
    """One batch: the model's input and, when present, the targets."""

    inputs: Any
    targets: Any = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; cast floating inputs (not targets) to ``dtype`` (the model's) when given."""
        return Batch(move_to(self.inputs, device, dtype), move_to(self.targets, device, None))

    @property
    def size(self) -> int | None:
        x = self.inputs
        while isinstance(x, (list, tuple)) and x:
            x = x[0]
        if isinstance(x, dict) and x:
            x = next(iter(x.values()))
        return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def split_batch(raw: Any, input_key: str | None = None, where: str = "data") -> Batch:
    """Turn one raw batch into a Batch.

    Raises:
        DataError: a dict batch without a recognisable input key, or an unsupported batch type.
    """
    if isinstance(raw, torch.Tensor):
        return Batch(raw)
    if isinstance(raw, np.ndarray):
        return Batch(_as_tensor(raw))
    if isinstance(raw, (tuple, list)):
        if not raw:
            raise DataError(f"{where}: a batch is an empty {type(raw).__name__}")
        return Batch(raw[0], raw[1] if len(raw) > 1 else None)
    if isinstance(raw, dict):
        keys = [input_key] if input_key else [k for k in INPUT_KEYS if k in raw]
        if not keys or keys[0] not in raw:
            raise DataError(
                f"{where}: batches are dicts with keys {sorted(map(str, raw))}; pass --input-key to name the model's input"
            )
        target = next((raw[k] for k in TARGET_KEYS if k in raw), None)
        return Batch(raw[keys[0]], target)
    raise DataError(f"{where}: a batch is a {type(raw).__name__}; expected a tensor, a tuple/list or a dict")


def _as_tensor(a: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a))
    if t.is_floating_point():
        t = t.float()
    return t


@dataclass
class DataSource:
    """A re-iterable source of batches and what is known about how it batches.

    Attributes:
        spec: the DATA spec (or the type name of an object passed in).
        batch_size: the loader's batch size, when known.
        dataset_len: number of samples, when known.
        drop_last: whether the loader drops a short last batch.
        shuffled: True/False when the sampler is known, None when not.
        input_key: the key naming inputs in dict batches.
        origin: the loader-ish object batches come from.
    """

    spec: str
    origin: Iterable[Any]
    batch_size: int | None = None
    dataset_len: int | None = None
    drop_last: bool = False
    shuffled: bool | None = None
    input_key: str | None = None
    _cache: list[Any] | None = field(default=None, repr=False)
    _one_shot: bool = False

    @property
    def num_batches(self) -> int | None:
        try:
            return len(self.origin)  # type: ignore[arg-type]
        except TypeError:
            return None

    @property
    def smallest_batch(self) -> int | None:
        """The smallest batch the loader will produce: the short last batch when drop_last is off."""
        if self.batch_size is None or self.dataset_len is None:
            return None
        rest = self.dataset_len % self.batch_size
        if rest and not self.drop_last:
            return rest
        return min(self.batch_size, self.dataset_len) if self.dataset_len else None

    def raw_batches(self, limit: int | None = None) -> Iterator[Any]:
        """Up to ``limit`` raw batches; an error in the user's data code is a UserCodeError naming the batch."""
        source = self._cached(limit) if self._one_shot else self._plain(limit)
        return usercode.iterate(source, spec=self.spec)

    def _plain(self, limit: int | None) -> Iterator[Any]:
        for i, raw in enumerate(self.origin):
            if limit is not None and i >= limit:
                return
            yield raw

    def _cached(self, limit: int | None) -> Iterator[Any]:
        if self._cache is None:
            self._cache = []
            self._iter = iter(self.origin)
        i = 0
        while limit is None or i < limit:
            if i < len(self._cache):
                yield self._cache[i]
            else:
                try:
                    raw = next(self._iter)
                except StopIteration:
                    return
                if len(self._cache) < _CACHE_LIMIT:
                    self._cache.append(raw)
                yield raw
            i += 1

    def batches(
        self, limit: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[Batch]:
        """Yield up to ``limit`` batches as Batch objects on ``device``."""
        for raw in self.raw_batches(limit):
            batch = split_batch(raw, self.input_key, self.spec)
            yield batch.to(device, dtype) if device is not None or dtype is not None else batch

    def first(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """The first batch.

        Raises:
            DataError: the source yields nothing.
        """
        for batch in self.batches(limit=1, device=device, dtype=dtype):
            return batch
        raise DataError(f"{self.spec}: yields no batches (empty dataset?); check the data spec")


def _from_loader(spec: str, loader: DataLoader, input_key: str | None) -> DataSource:
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    shuffled = isinstance(loader.sampler, RandomSampler) if loader.batch_sampler is not None else None
    return DataSource(spec, loader, loader.batch_size, n, bool(loader.drop_last), shuffled, input_key)


def _make_loader(dataset: Dataset, batch_size: int, seed: int, spec: str) -> DataLoader:
    # Our own loader over the user's dataset: shuffled with a fixed seed, as a training loader would be.
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"{spec}: the dataset is empty; check the data spec")
    gen = torch.Generator().manual_seed(seed)
    # A batch size above the dataset's length gives the same single batch; clamped, it also stays within what
    # the sampler can count (a batch size above sys.maxsize would fail inside itertools.islice).
    size = min(batch_size, len(dataset))  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=size, shuffle=True, generator=gen)


def as_source(obj: Any, spec: str, *, batch_size: int = 32, input_key: str | None = None, seed: int = 0) -> DataSource:
    """Wrap anything ``--data`` may yield in a DataSource.

    Raises:
        DataError: an empty dataset, mismatched input/target lengths, or an unsupported object.
    """
    if isinstance(obj, DataSource):
        return obj
    if isinstance(obj, DataLoader):
        source = _from_loader(spec, obj, input_key)
    elif isinstance(obj, (torch.Tensor, np.ndarray)):
        x = _as_tensor(obj) if isinstance(obj, np.ndarray) else obj
        if x.dim() == 0:
            raise DataError(f"{spec}: is a scalar; give a tensor of samples (first dimension = samples)")
        source = _from_loader(spec, _make_loader(TensorDataset(x), batch_size, seed, spec), input_key)
    elif (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj)
        and getattr(obj[0], "ndim", 0) > 0
        and getattr(obj[1], "ndim", 0) > 0
        and len(obj[0]) == len(obj[1])
    ):
        # Two arrays of equal length are (inputs, targets), one sample long or a million.
        x, y = (_as_tensor(v) if isinstance(v, np.ndarray) else v for v in obj)
        source = _from_loader(spec, _make_loader(TensorDataset(x, y), batch_size, seed, spec), input_key)
    elif isinstance(obj, Dataset) and hasattr(obj, "__len__"):
        source = _from_loader(spec, _make_loader(obj, batch_size, seed, spec), input_key)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict)):
        one_shot = iter(obj) is obj
        source = DataSource(spec, obj, None, None, False, None, input_key, _one_shot=one_shot)
        first = source.first()
        source.batch_size = first.size
    else:
        raise DataError(
            f"{spec}: gives a {type(obj).__name__}; return a DataLoader, a Dataset, a tensor, an (inputs, targets) "
            "pair or an iterable of batches"
        )
    if source.dataset_len == 0:
        raise DataError(f"{spec}: the dataset is empty; check the data spec")
    source.first()  # fail now, with the spec named, if it yields nothing
    return source


def parse_shape(text: str, what: str = "shape") -> tuple[int, ...]:
    """``3x32x32`` -> (3, 32, 32).

    Raises:
        SpecError: anything but positive integers joined by ``x``.
    """
    try:
        dims = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise SpecError(f"{what} {text!r} is not a shape; write positive sizes joined by x, e.g. 3x32x32")
    return dims


def random_example(shape: str | tuple[int, ...], batch_size: int, what: str = "--input-shape") -> torch.Tensor:
    """A small seeded random batch (at most 4 samples, at least 2 for BatchNorm) of one sample's ``shape``.

    Raises:
        SpecError: ``shape`` is not a shape. LimitError: the batch would not fit the memory limit.
    """
    dims = parse_shape(shape, what) if isinstance(shape, str) else tuple(int(d) for d in shape)
    n = min(batch_size, 4) if batch_size > 1 else 2
    label = "x".join(map(str, dims))
    check_allocation(f"{what} {label} ({n} samples)", n, dims, 4, share=BATCH_SHARE, hint="check the shape")
    return torch.randn(n, *dims, generator=torch.Generator().manual_seed(0))


class RandomBatches:
    """``random:SHAPE``: standard-normal batches drawn on demand from a seeded generator, so only the batches a
    command reads are ever made (and each is freed when the next is drawn); every pass draws the same ones."""

    def __init__(self, shape: tuple[int, ...], batch_size: int, seed: int, batches: int) -> None:
        self.shape, self.batch_size, self.seed, self.batches = shape, batch_size, seed, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.batches):
            yield [torch.randn(self.batch_size, *self.shape, generator=gen)]


def _random_source(spec: str, batch_size: int, seed: int, batches: int = 8) -> DataSource:
    shape = parse_shape(spec.split(":", 1)[1], "random:SHAPE")
    check_allocation(
        f"{spec} at batch size {batch_size}", batch_size, shape, 4, share=BATCH_SHARE,
        hint="lower --batch-size or the shape",
    )
    origin = RandomBatches(shape, batch_size, seed, batches)
    return DataSource(spec, origin, batch_size, batch_size * batches, False, False, None)


def _array_file(path: Path, spec: str, input_key: str | None = None) -> Any:
    if not path.is_file():
        raise SpecError(f"{spec}: {missing_file(path)}")
    suffix = path.suffix
    try:
        if suffix in (".pt", ".pth"):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise SpecError(
                    f"{spec}: cannot read it with torch.load(weights_only=True) ({describe_exception(exc)}); "
                    "save plain tensors, an (inputs, targets) tuple or a dict of tensors"
                ) from exc
            if isinstance(obj, dict):
                xk = _input_name(list(obj), spec, input_key)
                y = next((obj[k] for k in TARGET_KEYS if k in obj and k != xk), None)
                return (obj[xk], y) if y is not None else obj[xk]
            return tuple(obj) if isinstance(obj, list) else obj
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                names = list(arrays.files)
                if not names:
                    raise SpecError(f"{spec}: the .npz file holds no arrays")
                xk = _input_name(names, spec, input_key)
                yk = next((k for k in TARGET_KEYS if k in names and k != xk), None)
                x = arrays[xk]
                return (x, arrays[yk]) if yk else x
        if suffix == ".csv":
            return _read_csv(path, spec)
    except MemoryError:
        raise SpecError(f"{spec}: {path} holds more data than fits in memory; give a smaller file") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{spec}: cannot read {path} ({describe_exception(exc)})") from exc
    raise SpecError(f"{spec}: unsupported data file type {suffix}")


def _input_name(names: list[Any], spec: str, input_key: str | None) -> Any:
    """Which entry of a dict/.npz file holds the inputs: --input-key, a usual input name, or the only one."""
    if input_key is not None:
        if input_key not in names:
            raise SpecError(f"{spec}: no entry named {input_key!r} for --input-key; it holds {sorted(map(str, names))}")
        return input_key
    found = next((k for k in INPUT_KEYS if k in names), None)
    if found is not None:
        return found
    if len(names) == 1:
        return names[0]
    raise SpecError(
        f"{spec}: holds {sorted(map(str, names))} and none is named like inputs ({', '.join(INPUT_KEYS[:4])}, ...); "
        "pass --input-key NAME or rename the inputs to 'x'"
    )


def _read_csv(path: Path, spec: str) -> Any:
    import warnings

    with path.open(encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    has_header = any(not _is_number(h) for h in header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below as an error
        table = np.loadtxt(path, delimiter=",", skiprows=1 if has_header else 0, ndmin=2, dtype=np.float64)
    if table.size == 0:
        raise SpecError(f"{spec}: {path} has no rows of numbers")
    if has_header:
        names = [h.strip().lower() for h in header]
        target = next((names.index(k) for k in TARGET_KEYS if k in names), None)
        if target is not None:
            x = np.delete(table, target, axis=1)
            y = table[:, target]
            y_t = torch.as_tensor(y).long() if np.all(np.mod(y, 1) == 0) else torch.as_tensor(y).float()
            return (_as_tensor(x), y_t)
    return _as_tensor(table)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_data(
    spec: Any,
    *,
    namespace: types.ModuleType | None = None,
    batch_size: int = 32,
    input_key: str | None = None,
    seed: int = 0,
) -> DataSource | None:
    """Resolve a DATA spec (or object) to a DataSource.

    Args:
        spec: ``PATH.py:NAME``, ``PATH.py`` (NAME defaults to ``build_data``), ``package.module:NAME``,
            ``random:SHAPE``, a ``.pt``/``.npz``/``.csv`` file, or any object ``as_source`` accepts. None means
            ``build_data`` in the model's file when it defines one, else no data.
        namespace: the model's Python module, searched for ``build_data`` when ``spec`` is None.
        batch_size: batch size for sources bnaudit batches itself (tensors, datasets, files, random).
        input_key: the key of the input in dict batches.
        seed: seed for random data and for shuffling bnaudit's own loaders.

    Returns:
        The DataSource, or None when there is no data.

    Raises:
        SpecError: the spec names nothing usable.
        DataError: the data is empty or not in a supported layout.
    """
    if batch_size < 1:
        raise SpecError(f"--batch-size must be at least 1, got {batch_size}")
    if spec is None:
        if namespace is None or not hasattr(namespace, "build_data"):
            return None
        text = f"{getattr(namespace, '__file__', namespace.__name__)}:build_data"
        return as_source(_produce(getattr(namespace, "build_data"), text), text, batch_size=batch_size, input_key=input_key, seed=seed)
    if not isinstance(spec, (str, Path)):
        return as_source(spec, type(spec).__name__, batch_size=batch_size, input_key=input_key, seed=seed)
    text = str(spec)
    if text.startswith("random:"):
        return _random_source(text, batch_size, seed)
    if text.endswith(ARRAY_SUFFIXES):
        return as_source(_array_file(Path(text), text, input_key), text, batch_size=batch_size, input_key=input_key, seed=seed)
    py = parse_py_spec(text)
    if py is None and Path(text).exists() and not Path(text).is_file():
        raise SpecError(f"{text}: {missing_file(Path(text))}")
    if py is None:
        raise SpecError(
            f"{text}: not a data spec; use PATH.py[:NAME], package.module:NAME, random:SHAPE or a .pt/.npz/.csv file"
        )
    module = import_target(py)
    obj = lookup(module, py.attr or "build_data", text, "data")
    return as_source(_produce(obj, text), text, batch_size=batch_size, input_key=input_key, seed=seed)


def _produce(obj: Any, spec: str) -> Any:
    """Call a data factory; leave data objects (datasets, loaders, tensors) as they are."""
    if isinstance(obj, (torch.Tensor, np.ndarray, Dataset, DataLoader, tuple, list)) or not callable(obj):
        return obj
    return usercode.call(obj, spec=spec, action="building the data")


def load_predict(spec: Any, namespace: types.ModuleType | None = None) -> Any:
    """Resolve a PREDICT spec to a callable ``predict(model, inputs)``; None means ``predict`` in the model's
    file when present.

    Raises:
        SpecError: the spec names nothing callable.
    """
    if spec is None:
        fn = getattr(namespace, "predict", None) if namespace is not None else None
        return fn if callable(fn) else None
    if callable(spec):
        return spec
    text = str(spec)
    py = parse_py_spec(text)
    if py is None:
        raise SpecError(f"{text}: not a predict spec; use PATH.py:NAME or package.module:NAME")
    fn = lookup(import_target(py), py.attr or "predict", text, "predict function")
    if not callable(fn):
        raise SpecError(f"{text}: names a {type(fn).__name__}, not a function predict(model, inputs)")
    return fn
