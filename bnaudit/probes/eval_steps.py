"""Eval mode during training (BN307): over a recorded training history, the optimizer steps during which a
trainable BatchNorm sat in eval mode (``eval_mode_steps``), written over plain per-step series so any
recorder can feed it; ``history_eval_mode_steps`` reads them from a ``bnaudit.record`` History."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvalModeSpan:
    """Optimizer steps during which one trainable BatchNorm layer sat in eval mode.

    Attributes:
        layer: qualified name.
        steps: the recorded steps (as numbered in the history) counted against it.
        total_steps: recorded steps in the history.
        trained_steps: recorded steps at which it was trainable and an optimizer step ran.
        first, last: the first and last counted step.
        stalled_at: its ``num_batches_tracked`` at the first counted step (None when it has no counter).
        confirmed: whether the counter confirmed every counted step (it did not advance there).
    """

    layer: str
    steps: tuple[int, ...]
    total_steps: int
    trained_steps: int
    first: int
    last: int
    stalled_at: int | None
    confirmed: bool


def eval_mode_steps(
    steps: Sequence[int],
    training: Mapping[str, Sequence[bool]],
    requires_grad: Mapping[str, Sequence[bool]],
    num_batches_tracked: Mapping[str, Sequence[int]] | None = None,
    updated: Sequence[bool] | None = None,
    model_training: Sequence[bool | None] | None = None,
) -> list[EvalModeSpan]:
    """Find trainable BatchNorm layers that sat in eval mode through recorded optimizer steps.

    Works over plain per-step series (one entry per recorded step, read at the end of the step) so any
    recorder can feed it. A step counts against a layer when its affine parameters require grad, an
    optimizer step ran (``updated``), its training flag is False and, when a counter is given, its
    ``num_batches_tracked`` did not advance since the previous recorded step. The counter check matters: the
    flag is read at the end of a step, so the step in which a validation pass switched the model to eval
    mode shows ``training=False`` although its forward ran in train mode (its counter advanced). A counter of
    -1 marks a layer without running statistics; such a layer normalizes with batch statistics in eval mode
    too, so it is never counted. Nor is a step in which the model itself was in train mode: a model in train
    mode with some BatchNorm layers in eval mode keeps them there on purpose (``norm_eval`` in detection
    backbones, statistics frozen while fine-tuning); a validation pass puts the whole model in eval mode.

    Args:
        steps: the recorded step numbers.
        training: layer -> training flag per step.
        requires_grad: layer -> whether its affine parameters require grad, per step (pass True for a layer
            without affine parameters in a model that trains).
        num_batches_tracked: layer -> counter per step, when recorded.
        updated: per step, whether any parameter changed (an optimizer step ran); None: every step did.
        model_training: per step, the model's own training flag (None where unknown); None: unknown.

    Returns:
        One EvalModeSpan per layer with at least one counted step, by layer name.
    """
    total = len(steps)
    held = set() if model_training is None else {i for i, t in enumerate(model_training) if t is True}
    spans = []
    for layer in sorted(training):
        flags = list(training[layer])
        grads = list(requires_grad.get(layer, [True] * len(flags)))
        counts = list((num_batches_tracked or {}).get(layer, []))
        n = min(len(flags), len(grads), total)
        trained = [i for i in range(n) if grads[i] and (updated is None or bool(updated[i]))]
        hits = []
        confirmed = True
        for i in trained:
            if flags[i] or i in held:
                continue
            if counts:
                if i >= len(counts) or counts[i] < 0:
                    continue  # no running statistics: eval mode changes nothing
                if i == 0 or counts[i - 1] < 0 or counts[i] != counts[i - 1]:
                    continue  # the counter advanced: the forward of this step ran in train mode
            else:
                confirmed = False
            hits.append(i)
        if not hits:
            continue
        spans.append(
            EvalModeSpan(
                layer=layer,
                steps=tuple(int(steps[i]) for i in hits),
                total_steps=total,
                trained_steps=len(trained),
                first=int(steps[hits[0]]),
                last=int(steps[hits[-1]]),
                stalled_at=int(counts[hits[0]]) if counts else None,
                confirmed=confirmed,
            )
        )
    return spans


def history_eval_mode_steps(history: Any) -> list[EvalModeSpan]:
    """``eval_mode_steps`` over a recorded History (``bnaudit.record(...).history``, or the Recorder).

    Raises:
        TypeError: ``history`` offers no ``bn_layers`` / ``bn_modes(layer)`` accessor.
    """
    history = getattr(history, "history", history)
    if not hasattr(history, "bn_layers") or not hasattr(history, "bn_modes"):
        raise TypeError(f"a {type(history).__name__} is not a recorded History (bnaudit.record(...).history)")
    training: dict[str, list[bool]] = {}
    grads: dict[str, list[bool]] = {}
    counts: dict[str, list[int]] = {}
    steps: list[int] = []
    updated: list[bool] | None = None
    info = getattr(history, "bn_info", {})
    for layer in history.bn_layers:
        modes = history.bn_modes(layer)
        steps = [int(s) for s in modes.steps]
        training[layer] = [bool(v) for v in modes.training]
        if info.get(layer, {}).get("affine") is False:
            # no affine parameters: it is part of whatever trains, and its statistics stall all the same
            grads[layer] = [True] * len(training[layer])
        else:
            grads[layer] = [bool(v) for v in modes.requires_grad]
        counts[layer] = [int(v) for v in modes.num_batches_tracked]
        updated = [bool(v) for v in modes.updated]
    return eval_mode_steps(steps, training, grads, counts, updated, getattr(history, "model_training", None))


__all__ = [
    "EvalModeSpan",
    "eval_mode_steps",
    "history_eval_mode_steps",
]
