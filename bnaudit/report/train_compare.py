"""The terminal rendering of a train-compare result: the summary table (mean ± std across seeds, best cells
marked), the verdict, the distributed facts and the notes, as text for the CLI to print."""

from __future__ import annotations

from typing import Any

__all__ = ["render_table"]


def render_table(result: Any, *, color: bool) -> str:
    """The summary table, the verdict and the notes as terminal text (rich)."""
    import io

    from rich.console import Console
    from rich.table import Table

    from bnaudit.training.table import HEADERS, summary_rows

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=120 if not color else None)
    s = result.settings
    table = Table(
        title=f"train-compare: {s.get('optimizer')}, loss {s.get('loss')}, target loss {s.get('target_loss')}, "
        f"{len(s.get('seeds', []))} seeds (mean ± std)"
        + (f", {s.get('nproc')} processes: batch per device" if int(s.get("nproc") or 1) > 1 else ""),
        title_justify="left",
    )
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "variant" else "right")
    for row in summary_rows(result):
        table.add_row(*[f"[bold green]{v}*[/]" if h in row.best else v for h, v in zip(HEADERS, row.cells)])
    console.print(table)
    console.print("* best in its column among cells without divergence", style="dim")
    console.print()
    for line in result.verdict:
        console.print(f"- {line}", highlight=False)
    for variant, why in getattr(result, "unavailable", {}).items():
        console.print(f"- {variant}: unavailable here, not run ({why})", highlight=False)
    nproc = int(s.get("nproc") or 1)
    if nproc > 1:
        dist = s.get("distributed") or {}
        where = f"{nproc} processes ({dist.get('backend')}, DistributedDataParallel)"
        console.print(
            f"\n{where}: batch = per-device batch; global batch = {nproc} × batch "
            f"({', '.join(str(b) for b in s.get('global_batch_sizes', []))}); losses are global-batch losses",
            highlight=False,
        )
        workers = f"{s.get('threads')} thread(s) per process"
        shown: set[str] = set()
        for run in result.runs:  # BN402's evidence: one line per variant (its first run)
            for note in run.notes:
                if "across the" in note and run.variant not in shown:
                    shown.add(run.variant)
                    console.print(f"- {run.variant} (lr {run.lr:g}, seed {run.seed}): {note}", highlight=False)
    else:
        workers = f"{s.get('threads')} thread(s), {s.get('workers')} worker(s)"
    console.print(
        f"\n{len(result.runs)} runs in {s.get('seconds_total', 0):.1f} s ({s.get('seconds_per_run', 0):.2f} s per run, "
        f"{workers})",
        style="dim",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    return buf.getvalue()
