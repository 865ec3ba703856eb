"""Model transforms: each takes a model, never modifies it, and returns a ``TransformResult`` holding the new
model (``.model``) and the list of what changed (``.changes``, ``.skipped`` with reasons).

``insert_bn`` puts BatchNorm after hidden Linear/Conv layers (optionally function-preserving with calibration
data), ``fold_bn`` fuses eval-mode BatchNorm into the preceding layer for inference, ``swap_norm`` replaces
BatchNorm by GroupNorm/LayerNorm/InstanceNorm/FrozenBatchNorm/SyncBatchNorm, and ``save_model`` / ``load``
write and read the result as a safe ``weights_only`` torch file. ``recalibrate`` lives in
``bnaudit.transforms.recalibrate``."""

from bnaudit.loading.modelfile import load_into
from bnaudit.loading.models import load, load_saved
from bnaudit.loading.modules import (
    FeatureBatchNorm1d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    NormalizedLayer,
)
from bnaudit.loading.plan import apply_plan
from bnaudit.transforms.base import Change, TransformResult, architecture_diff
from bnaudit.transforms.fold_bn import fold_bn, fused_weights
from bnaudit.transforms.insert_bn import insert_bn
from bnaudit.transforms.saving import save_model
from bnaudit.transforms.swap_norm import group_count, swap_norm

__all__ = [
    "Change",
    "FeatureBatchNorm1d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "NormalizedLayer",
    "TransformResult",
    "apply_plan",
    "architecture_diff",
    "fold_bn",
    "fused_weights",
    "group_count",
    "insert_bn",
    "load",
    "load_into",
    "load_saved",
    "save_model",
    "swap_norm",
]
