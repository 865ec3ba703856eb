"""Loading what the user points bnaudit at: models (``models``), data and predict functions (``data``),
from the spec strings the CLI and the config file take (``specs``); and bnaudit's own model file
(``modelfile``), with the plan of structural edits it stores (``plan``) and the module classes a plan may
name (``modules``)."""

from bnaudit.loading.data import Batch, DataSource, as_source, load_data, load_predict, parse_shape
from bnaudit.loading.models import LoadedModel, load_model, load_weights

__all__ = [
    "Batch",
    "DataSource",
    "LoadedModel",
    "as_source",
    "load_data",
    "load_model",
    "load_predict",
    "load_weights",
    "parse_shape",
]
