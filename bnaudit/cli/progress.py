"""The live progress display of ``bnaudit train-compare``: a rich progress bar on stderr fed by the
comparison's progress callback."""

from __future__ import annotations

from typing import Any

__all__ = ["live_progress"]


def live_progress(quiet: bool) -> tuple[Any, Any]:
    """A rich live progress display on stderr (runs, steps, ETA) and the callback feeding it."""
    import contextlib

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return contextlib.nullcontext(), None
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def callback(ev: Any) -> None:
        if ev.kind == "start":
            tasks["all"] = bar.add_task("runs", total=ev.total_runs, info="")
            tasks["steps"] = bar.add_task("steps", total=ev.total_steps, info="")
            return
        info = f"{ev.variant} lr={ev.lr:g} bs={ev.batch_size} seed={ev.seed}"
        if ev.kind == "run":
            tasks["run"] = ev.step
            tasks["last"] = 0
            bar.update(tasks["all"], info=info)
        elif ev.kind == "step":
            bar.update(
                tasks["steps"],
                advance=ev.step - tasks.get("last", 0),
                info=f"loss {ev.loss:.4g}" if ev.loss is not None else "",
            )
            tasks["last"] = ev.step
        elif ev.kind == "done":
            bar.update(tasks["steps"], advance=max(0, ev.total_steps - tasks.get("last", 0)))
            tasks["last"] = 0
            res = ev.result
            status = (
                "diverged" if res is not None and res.diverged else f"{res.seconds:.1f}s" if res is not None else ""
            )
            bar.update(tasks["all"], advance=1, info=f"{info}: {status}")

    return bar, callback
