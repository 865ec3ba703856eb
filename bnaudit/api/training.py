"""``bnaudit.train_compare`` from objects or specs, as ``bnaudit train-compare`` runs it: the model, data,
validation data and the user's variant go through the loaders, then ``bnaudit.training.train_compare`` runs
the comparison. The caller's global random state is left as it was."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.api.preparation import prepare, preserved_rng

if TYPE_CHECKING:
    from bnaudit.training import CompareResult

__all__ = ["train_compare"]


def train_compare(
    model: Any,
    data: Any = None,
    *,
    batch_sizes: int | Sequence[int] = (64,),
    val_data: Any = None,
    user_model: Any = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    input_key: str | None = None,
    reinit: bool | None = None,
    device: str = "cpu",
    **options: Any,
) -> CompareResult:
    """Train a model with and without normalization under identical conditions and compare them.

    Args:
        model: an nn.Module, a zero-argument factory, or a MODEL spec.
        data: training DATA (spec or object); None: ``build_data`` in the model's file.
        batch_sizes: batch sizes to sweep (the largest also batches data bnaudit loads itself).
        val_data: validation DATA (spec or object); default: a share of ``data``.
        user_model: the ``user`` variant: a module or MODEL spec.
        weights: a state_dict file to load into the model first (then every seed starts from it unless
            ``reinit=True``).
        trust_pickle: allow ``.pt`` MODELs holding a whole pickled module.
        input_key: the input's key in dict batches.
        reinit: re-draw the parameters from each seed (default: yes, unless ``weights`` are given).
        device: where to train.
        **options: the rest of ``bnaudit.training.train_compare``'s options (variants, lrs, seeds, steps,
            epochs, optimizer, momentum, loss, target_loss, val_fraction, record, unit_layer, unit, ics_layer,
            threads, workers, nproc, progress, ...).

    Returns:
        The CompareResult; ``settings["model"]`` and ``settings["data"]`` name what was compared.

    Raises:
        UsageError: no training data, or invalid options. DataError, SpecError, WeightsError, TransformError:
            as the loaders and the comparison say.
    """
    from torch import nn

    from bnaudit.errors import UsageError
    from bnaudit.loading import load_data, load_model
    from bnaudit.training import train_compare as compare

    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    largest = max(sizes) if sizes else 64
    factory = callable(model) and not isinstance(model, (nn.Module, str, Path))
    with preserved_rng(device):
        if factory:
            target, name = model, getattr(model, "__name__", type(model).__name__)
            source = load_data(data, batch_size=largest, input_key=input_key)
        else:
            prepared = prepare(model, data, device=None, weights=weights, trust_pickle=trust_pickle,
                               input_key=input_key, batch_size=largest, example=False)
            target, name, source = prepared.model, prepared.spec, prepared.data
        if source is None:
            raise UsageError("train-compare needs training data: pass --data (or define build_data in the model file)")
        val_source = load_data(val_data, batch_size=largest, input_key=input_key) if val_data is not None else None
        user = _user_variant(user_model, trust_pickle, load_model)
        result = compare(
            target, source, batch_sizes=sizes, val_data=val_source, user_model=user,
            reinit=(weights is None) if reinit is None else reinit, device=device, **options,
        )
    result.settings["model"] = name
    result.settings["data"] = source.spec
    return result


def _user_variant(user_model: Any, trust_pickle: bool, load_model: Callable[..., Any]) -> Any:
    if user_model is None or not isinstance(user_model, (str, Path)):
        return user_model
    return load_model(user_model, trust_pickle=trust_pickle).module
