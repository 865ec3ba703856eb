"""Typed errors. Every error a user can cause derives from BnauditError; the CLI prints its one-line
message and exits with status 2 (a traceback only with --debug). Messages name the offending spec, file or
key and say what to do."""

from __future__ import annotations


class BnauditError(Exception):
    """Base of every error bnaudit raises on purpose. ``str(err)`` is the single line the user sees."""

    exit_code = 2


class SpecError(BnauditError):
    """A MODEL/DATA/PREDICT spec cannot be resolved: missing file, nothing under that name, a factory that
    raises, or something that is not what the spec must name (e.g. not an nn.Module)."""


class UserCodeError(SpecError):
    """The user's own code (a model file at import, a factory, a data builder, a predict function, a forward
    pass) called ``sys.exit`` or raised while bnaudit ran it; the message names the file and line."""


class WeightsError(BnauditError):
    """A weights or checkpoint file cannot be read safely (missing, corrupt, pickled module without
    --trust-pickle, keys that do not match the model)."""


class DataError(BnauditError):
    """Data cannot be used: empty dataset, unknown batch layout, or batches the model rejects."""


class ConfigError(BnauditError):
    """A bnaudit.yaml file or a rule option is invalid; the message names file:line and the key."""


class UsageError(BnauditError):
    """Options that contradict each other or name unknown rules, formats or devices."""


class OutputError(BnauditError):
    """An output path cannot be written: it exists without --force (or its config entry says
    ``overwrite: false``), it is an input of the same run or a ``.py`` file, it is not a regular file, its
    folder is missing or not writable."""


class LimitError(BnauditError):
    """An input would need more memory or bytes than bnaudit allows itself (a generated batch, a config file,
    processes); the message says what would be needed, the limit, and how to change either."""


class TransformError(BnauditError):
    """A model transform cannot be applied as asked (e.g. fold-bn on a train-mode model)."""
