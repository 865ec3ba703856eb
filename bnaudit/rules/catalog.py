"""Imports every rule family so that the registry is complete. A new family module is added here."""

from bnaudit.rules import architecture  # noqa: F401
from bnaudit.rules import layer_settings  # noqa: F401
from bnaudit.rules import data  # noqa: F401
from bnaudit.rules import modes  # noqa: F401
from bnaudit.rules import running_stats  # noqa: F401
from bnaudit.rules import distributed  # noqa: F401
