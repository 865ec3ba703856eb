"""The one preparation path every API function and CLI command goes through: load the model, the data and
the predict function from objects or specs, choose the device, and build the example input.

``prepare`` returns a ``Prepared``. The example input is, in this order: a random batch of ``input_shape``,
the first batch of the data, or a random batch shaped for the model's first layer. Random examples come
from bnaudit's own seeded generator, and ``preserved_rng`` keeps the caller's global random state
(torch, Python's ``random``, NumPy) exactly as it was: a shuffling DataLoader without a generator of its own
draws its order from torch's global generator, so reading a batch for an audit would otherwise change the
user's next epoch."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit.loading import DataSource, LoadedModel, load_data, load_model, load_predict

__all__ = ["Prepared", "prepare", "preserved_rng", "with_example"]


@dataclass(frozen=True)
class Prepared:
    """A model, its data and predict function, ready for one command.

    Attributes:
        loaded: the model and where it came from (``loaded.module`` is the user's object when one was given).
        data: the data source, or None (no data given and no ``build_data`` in the model's file).
        predict: the user's ``predict(model, inputs)``, or None.
        device: where the command runs.
        dtype: the model's floating-point dtype (None when it has no floating-point parameters yet).
        example: the example input, or None (none was asked for, or none could be built).
        example_note: where the example came from, in words (empty without one).
        example_inferred: True when the example was guessed from the model's first layer (a model may reject
            it; callers may then go on without one).
        data_spec: the data as a spec a later command can take (``random:SHAPE`` for ``input_shape``).
        data_given: the caller gave the data (not found as ``build_data`` in the model's file).
        owned: the model was built from a spec (bnaudit's own object, free to move or call); False for a
            module the caller passed in.
        lazy_initialized: the model had uninitialized lazy modules and preparing it gave them their shapes.
    """

    loaded: LoadedModel
    data: DataSource | None
    predict: Callable[..., Any] | None
    device: torch.device
    dtype: torch.dtype | None
    example: Any = None
    example_note: str = ""
    example_inferred: bool = False
    data_spec: str | None = None
    data_given: bool = False
    owned: bool = False
    lazy_initialized: bool = False

    @property
    def model(self) -> nn.Module:
        return self.loaded.module

    @property
    def spec(self) -> str:
        return self.loaded.spec

    def without_example(self, note: str) -> Prepared:
        """The same preparation with the example dropped (the model rejected an inferred one)."""
        return replace(self, example=None, example_note=note, example_inferred=False)


@contextmanager
def preserved_rng(device: torch.device | str | None = None) -> Iterator[None]:
    """Run the body and put back the global random state it used: torch's CPU generator (and the CUDA
    generator of ``device``), Python's ``random`` and NumPy's legacy generator."""
    import numpy as np

    devices = [device] if _usable_cuda(device) else []
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _usable_cuda(device: torch.device | str | None) -> bool:
    # A bad device string is the preparation's to report (one clear line), not the RNG guard's.
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        return False
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return dev.index is None or dev.index < torch.cuda.device_count()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a command runs on (None: the CPU).

    Raises:
        UsageError: an unknown device or CUDA where it is not available.
    """
    from bnaudit.audit import resolve_device as audit_device

    return audit_device(device)


def prepare(
    model: Any,
    data: Any = None,
    predict: Any = None,
    *,
    device: str | torch.device | None = "cpu",
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    input_shape: str | tuple[int, ...] | None = None,
    input_key: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    example: bool = True,
    data_default: bool = True,
) -> Prepared:
    """Load a model, its data and predict function from objects or specs, and build an example input.

    Args:
        model: an nn.Module or a MODEL spec (``model.py:build_model``, ``pkg.mod:Net``, a bnaudit ``.pt``).
        data: a DATA spec or object; None: ``build_data`` in the model's file if it has one.
        predict: the user's ``predict(model, inputs)`` or its spec; None: ``predict`` in the model's file.
        device: ``cpu`` or ``cuda[:N]`` (the model is not moved here).
        weights: a state_dict file to load into the model first.
        trust_pickle: allow a ``.pt`` MODEL holding a whole pickled module.
        input_shape: one sample's shape (``"3x32x32"``): the example is a random batch of it.
        input_key: the input's key in dict batches.
        batch_size: batch size where bnaudit batches the data itself.
        seed: seed of the generator behind an inferred random example.
        example: build the example input (False: leave it to the caller, see ``with_example``).
        data_default: without ``data``, use ``build_data`` from the model's file (False: no data).

    Returns:
        The Prepared model, data, predict function, device and example. The global RNG is as it was.

    Raises:
        SpecError, WeightsError, DataError, UsageError, LimitError: bad input, with a one-line message.
    """
    dev = resolve_device(device)
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    source = None
    if data is not None or data_default:
        with preserved_rng(dev):
            source = load_data(data, namespace=loaded.namespace, batch_size=batch_size, input_key=input_key)
    prepared = Prepared(
        loaded=loaded,
        data=source,
        predict=load_predict(predict, loaded.namespace),
        device=dev,
        dtype=_model_dtype(loaded.module),
        data_spec=(data if isinstance(data, str) else source.spec) if source is not None else None,
        data_given=data is not None,
        owned=not isinstance(model, nn.Module),
    )
    prepared = _initialize_lazy(prepared, input_shape=input_shape, batch_size=batch_size, seed=seed)
    if not example:
        return prepared
    return with_example(prepared, input_shape=input_shape, batch_size=batch_size, seed=seed)


def _initialize_lazy(prepared: Prepared, *, input_shape: Any, batch_size: int, seed: int) -> Prepared:
    """Give a model built from a spec its lazy modules' shapes (``nn.LazyLinear``, ``nn.LazyBatchNorm2d``):
    one forward pass of the example input, in eval mode under no_grad (no running statistic moves), with
    their initial values drawn from a generator seeded with ``seed``. Every command copies the model, and
    torch cannot copy an uninitialized parameter. A module the caller passed in is theirs: refused instead.

    Raises:
        UsageError: uninitialized lazy modules in a caller's module, or no input to initialize them with.
        DataError: the model rejects the example input.
    """
    from torch.nn.modules.lazy import LazyModuleMixin

    from bnaudit.errors import DataError, UsageError
    from bnaudit.layers import eval_mode

    model = prepared.model
    lazy = [n or type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if not lazy:
        return prepared
    shown = ", ".join(lazy[:3]) + (f" and {len(lazy) - 3} more" if len(lazy) > 3 else "")
    what = f"{len(lazy)} lazy module{'s' * (len(lazy) > 1)} not initialized yet ({shown})"
    if not prepared.owned:
        raise UsageError(f"{what}: call the model once on a real batch (model(x)) before auditing it, so that "
                         "their shapes are known")
    given = with_example(prepared, input_shape=input_shape, batch_size=batch_size, seed=seed)
    if given.example is None or given.example_inferred:  # a shape guessed from a later layer would fix a wrong one
        raise UsageError(f"{what}: pass --data or --input-shape so that bnaudit can run the model once to "
                         "initialize them")
    example = given.example
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(model):
            torch.manual_seed(seed)
            model(example)
    except Exception as exc:  # noqa: BLE001 - the model's own code: any error is a bad input
        raise DataError(f"{what}; the model rejects the example input that would initialize them: "
                        f"{type(exc).__name__}: {exc}") from exc
    return replace(prepared, dtype=_model_dtype(model), lazy_initialized=True)


def with_example(
    prepared: Prepared, *, input_shape: str | tuple[int, ...] | None = None, batch_size: int = 32, seed: int = 0,
    use_data: bool = True,
) -> Prepared:
    """``prepared`` with its example input: a random batch of ``input_shape``, else the first batch of the data
    (with ``use_data``), else a random batch shaped for the model's first layer; all on the CPU.

    Raises:
        SpecError: ``input_shape`` is not a shape. DataError: the data yields no batches.
    """
    from bnaudit.loading.data import random_example

    if input_shape is not None:
        ex = random_example(input_shape, batch_size)
        spec = prepared.data_spec if prepared.data_given else f"random:{_shape_text(input_shape)}"
        return replace(prepared, example=ex, example_note=f"random {tuple(ex.shape)} from --input-shape",
                       data_spec=spec)
    if use_data and prepared.data is not None:
        with preserved_rng(prepared.device):
            ex = prepared.data.first().inputs
        return replace(prepared, example=ex, example_note=f"first batch of {prepared.data.spec}")
    ex, how = inferred_example(prepared.model, seed)
    if ex is None:
        return prepared
    return replace(prepared, example=ex, example_note=f"random {how}", example_inferred=True)


def inferred_example(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor | None, str]:
    """A random input shaped for ``model``'s first layer, drawn from a generator seeded with ``seed`` (the global
    RNG is left as it was), and how it was shaped; ``(None, why)`` when the first layer does not say."""
    from bnaudit.audit import infer_example

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return infer_example(model)


def _shape_text(shape: str | tuple[int, ...]) -> str:
    return shape if isinstance(shape, str) else "x".join(str(int(d)) for d in shape)


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    from bnaudit.audit import model_dtype

    return model_dtype(model)
