"""The summary table of a comparison as plain strings, shared by the terminal, HTML and Markdown output:
one row per variant × learning rate × batch size, mean ± std across seeds, and which cells are best."""

from __future__ import annotations

from dataclasses import dataclass

from bnaudit.training.results import CompareResult
from bnaudit.training.verdict import fmt_num, fmt_stat

HEADERS = ("variant", "lr", "batch", "diverged", "steps to target", "final loss", "val loss", "val acc", "s/run")


@dataclass(frozen=True)
class Row:
    """One table row; ``best`` names the columns in which this cell is the best."""

    cells: tuple[str, ...]
    best: frozenset[str]


def summary_rows(result: CompareResult) -> list[Row]:
    """Rows in cell order; the best value per column (see ``results.best_cells``) is flagged."""
    best = result.best
    target = result.settings.get("target_loss")
    rows = []
    for c in result.cells:
        key = (c.variant, c.lr, c.batch_size)
        flags = {
            col
            for col, name in (
                ("steps to target", "steps_to_target"),
                ("final loss", "final_loss"),
                ("val loss", "val_loss"),
                ("val acc", "val_accuracy"),
            )
            if best.get(name) == key
        }
        if target is None:
            steps = "–"
        elif c.reached == 0:
            steps = "not reached"
        else:
            steps = fmt_stat(c.steps_to_target, "steps") + ("" if c.reached == c.seeds else f" ({c.reached}/{c.seeds})")
        rows.append(
            Row(
                (
                    c.variant,
                    fmt_num(c.lr),
                    str(c.batch_size),
                    f"{c.diverged}/{c.seeds}",
                    steps,
                    fmt_stat(c.final_loss),
                    fmt_stat(c.val_loss),
                    fmt_stat(c.val_accuracy, "pct"),
                    f"{c.seconds.mean:.2f}" if c.seconds.mean is not None else "–",
                ),
                frozenset(flags),
            )
        )
    return rows


def markdown_table(result: CompareResult) -> str:
    """The summary as a GitHub-flavoured Markdown table (best cells in bold)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    for row in summary_rows(result):
        cells = [f"**{v}**" if h in row.best else v for h, v in zip(HEADERS, row.cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
