"""The verdict: plain sentences, each built from the summary numbers (never from expectations).

One sentence per learning rate × batch size cell comparing every variant with the reference ("baseline"
when present), then the overall picture: in how many settings each variant reached the target sooner, the
largest learning rate each trained at without diverging, and the best validation accuracy of each, with a
remark when the difference is within noise or under one accuracy point ("not magic on easy problems")."""

from __future__ import annotations

from collections.abc import Sequence

from bnaudit.training.results import CellSummary, Stat


def fmt_num(x: float) -> str:
    """Short human form of a setting or a loss (0.5, 1e-03, 0.58)."""
    if x == 0:
        return "0"
    if abs(x) >= 0.01 and abs(x) < 1000:
        return f"{x:.3g}"
    return f"{x:.0e}"


def fmt_stat(s: Stat, kind: str = "loss") -> str:
    """``mean ± std`` for steps (integers), accuracy (percent) or losses (3 significant digits)."""
    if s.mean is None:
        return "–"
    std = s.std or 0.0
    if kind == "steps":
        return f"{s.mean:.0f} ± {std:.0f}"
    if kind == "pct":
        return f"{100 * s.mean:.1f} ± {100 * std:.1f}%"
    return f"{s.mean:.3g} ± {std:.2g}"


def _phrase(c: CellSummary, target: float | None, steps: int | dict[int, int]) -> str:
    if isinstance(steps, dict):
        steps = steps.get(c.batch_size, max(steps.values()))
    parts = []
    if c.diverged == c.seeds:
        return f"diverged in {c.diverged}/{c.seeds} seeds"
    if target is not None:
        if c.reached == c.seeds:
            parts.append(f"reached loss {fmt_num(target)} in {fmt_stat(c.steps_to_target, 'steps')} steps")
        elif c.reached:
            parts.append(
                f"reached loss {fmt_num(target)} in {c.reached}/{c.seeds} seeds "
                f"({fmt_stat(c.steps_to_target, 'steps')} steps)"
            )
        else:
            parts.append(f"did not reach loss {fmt_num(target)} within {steps} steps")
    if c.diverged:
        parts.append(f"diverged in {c.diverged}/{c.seeds} seeds")
    if c.val_accuracy.mean is not None:
        parts.append(f"validation accuracy {fmt_stat(c.val_accuracy, 'pct')}")
    elif c.val_loss.mean is not None:
        parts.append(f"validation loss {fmt_stat(c.val_loss)}")
    return ", ".join(parts)


def _faster(a: CellSummary, b: CellSummary) -> bool:
    """``a`` reached the target sooner than ``b``: in more seeds, or as often and >10% fewer steps."""
    if a.reached != b.reached:
        return a.reached > b.reached
    if not a.reached or a.steps_to_target.mean is None or b.steps_to_target.mean is None:
        return False
    return a.steps_to_target.mean < 0.9 * b.steps_to_target.mean


def verdict(cells: Sequence[CellSummary], *, target: float | None, steps: int | dict[int, int]) -> list[str]:
    """Sentences summarising ``cells`` (see the module docstring).

    Args:
        cells: per-cell summaries across seeds.
        target: the target loss used for steps-to-target (None when there was none).
        steps: the number of steps each run was given (or batch size -> steps).

    Returns:
        The sentences, most specific first.
    """
    if not cells:
        return ["No runs."]
    variants = list(dict.fromkeys(c.variant for c in cells))
    ref = "baseline" if "baseline" in variants else variants[0]
    others = [v for v in variants if v != ref]
    by = {(c.variant, c.lr, c.batch_size): c for c in cells}
    settings = list(dict.fromkeys((c.lr, c.batch_size) for c in cells))
    multi_bs = len({bs for _, bs in settings}) > 1
    out: list[str] = []
    for lr, bs in settings:
        where = f"lr {fmt_num(lr)}" + (f", batch {bs}" if multi_bs else "")
        rc = by.get((ref, lr, bs))
        pieces = [f"with {v}, {_phrase(by[(v, lr, bs)], target, steps)}" for v in others if (v, lr, bs) in by]
        if rc is not None:
            pieces.append(f"{ref}: {_phrase(rc, target, steps)}" if others else _phrase(rc, target, steps))
        out.append(f"At {where}: " + "; ".join(pieces) + ".")
    if others and target is not None:
        for v in others:
            pairs = [
                (by[(v, lr, bs)], by[(ref, lr, bs)]) for lr, bs in settings if (v, lr, bs) in by and (ref, lr, bs) in by
            ]
            wins = sum(_faster(a, b) for a, b in pairs)
            losses = sum(_faster(b, a) for a, b in pairs)
            out.append(
                f"{v} reached the target sooner than {ref} in {wins} of {len(pairs)} settings"
                + (f" and later in {losses}" if losses else "")
                + "."
            )
    lrs = sorted({lr for lr, _ in settings})
    if len(lrs) > 1:
        stable = []
        for v in variants:
            ok = [c.lr for c in cells if c.variant == v and c.diverged == 0]
            stable.append(f"{v} {fmt_num(max(ok))}" if ok else f"{v} none")
        out.append("Largest learning rate trained without divergence in every seed: " + ", ".join(stable) + ".")
    sizes = sorted({bs for _, bs in settings})
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        parts = []
        for v in variants:
            for lr in lrs:
                a, b = by.get((v, lr, small)), by.get((v, lr, large))
                if a is None or b is None or a.val_accuracy.mean is None or b.val_accuracy.mean is None:
                    continue
                gap = 100 * (a.val_accuracy.mean - b.val_accuracy.mean)
                parts.append(
                    f"{v}{'' if len(lrs) == 1 else f' (lr {fmt_num(lr)})'} {fmt_stat(a.val_accuracy, 'pct')} at batch "
                    f"{small} vs {fmt_stat(b.val_accuracy, 'pct')} at batch {large} ({gap:+.1f} points)"
                )
        if parts:
            out.append("Batch-size sensitivity (validation accuracy): " + "; ".join(parts) + ".")
    best: dict[str, CellSummary] = {}
    for v in variants:
        ok = [c for c in cells if c.variant == v and c.diverged < c.seeds and c.val_accuracy.mean is not None]
        if ok:
            best[v] = max(ok, key=lambda c: c.val_accuracy.mean or 0.0)
    if len(best) > 1:
        desc = [
            f"{v} {fmt_stat(c.val_accuracy, 'pct')} (lr {fmt_num(c.lr)}"
            + (f", batch {c.batch_size}" if multi_bs else "")
            + ")"
            for v, c in best.items()
        ]
        out.append("Best validation accuracy: " + "; ".join(desc) + ".")
        if ref in best:
            r = best[ref]
            for v in others:
                if v not in best:
                    continue
                c = best[v]
                gap = 100 * ((c.val_accuracy.mean or 0) - (r.val_accuracy.mean or 0))
                noise = 100 * max(c.val_accuracy.std or 0, r.val_accuracy.std or 0)
                if abs(gap) < max(1.0, noise):
                    out.append(
                        f"At their best settings {v} and {ref} are within {max(1.0, noise):.1f} accuracy points of "
                        f"each other ({fmt_stat(c.val_accuracy, 'pct')} vs {fmt_stat(r.val_accuracy, 'pct')}): "
                        "here the normalization makes little difference to the final accuracy."
                    )
                else:
                    better = v if gap > 0 else ref
                    out.append(f"At their best settings {better} is ahead by {abs(gap):.1f} accuracy points.")
    return out
