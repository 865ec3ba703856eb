"""``bnaudit watch SCRIPT.py [ARGS...]`` / ``bnaudit watch -m MODULE [ARGS...]``: run the user's training program
unchanged, find the models it trains, record them and report. Options come before the script; everything
after the script belongs to it. The program's stdout, stderr, traceback and exit status pass through; bnaudit's
summary goes to stderr after the program ends, and the report folder is written before the program's outcome
(its traceback, its exit status) is passed on."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit.cli.app import command, stdout
from bnaudit.cli.options import ForceOpt, split_list
from bnaudit.errors import BnauditError, UsageError
from bnaudit.findings import FAIL_ON_CHOICES

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _summary(w: Any, folder: Path | None, console: Any) -> None:
    from rich.markup import escape

    from bnaudit.watching.outputs import most_drifting

    if not w.models:
        console.print("[bold]bnaudit watch[/]: no model was trained (no optimizer.step() ran)")
    for model, report in zip(w.models, w.reports, strict=True):
        meta = report.meta
        console.print(f"[bold]bnaudit watch[/]: [bold]{escape(model.name)}[/] ({escape(model.optimizer)}): "
                      f"{meta['steps']} steps ({meta['recorded_steps']} history rows), {meta['layers_recorded']} layers, "
                      f"{meta['batchnorm_layers']} BatchNorm; {len(report.findings)} finding(s)")
        for f in report.findings:
            where = f" at {escape(f.location)}" if f.location else ""
            step = f" step {f.step}" if f.step is not None else ""
            style = _SEVERITY_STYLE.get(f.severity, "")
            console.print(f"  [{style}]{f.code} {f.severity}[/]{step}{where}: {escape(f.message)}")
            console.print(f"    [dim]fix: {escape(f.fix)}[/]")
        top = most_drifting(model.history, 3)
        if top:
            console.print("  most drifting: " + ", ".join(f"{escape(n)} ({s:.3g} std)" for n, s in top))
        for note in meta.get("notes", []):
            console.print(f"  [dim]note: {escape(str(note))}[/]")
    for note in w.notes:
        console.print(f"  [dim]note: {escape(note)}[/]")
    if folder is not None:
        console.print(f"[bold]bnaudit watch[/]: wrote {escape(str(folder))}/ (report.json, report.html, histories, plots)")


@command("watch", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def watch_cmd(
    script: Annotated[str, typer.Argument(help="The training script (a .py file), or with -m a module name.", metavar="SCRIPT",
                                          show_default=False)],
    args: Annotated[list[str] | None, typer.Argument(help="The script's own arguments.", show_default=False)] = None,
    module: Annotated[bool, typer.Option("-m", "--module", help="Run SCRIPT as a module, like python -m.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="The report folder (a fresh numbered one if it exists, "
                                      "unless --force).")] = Path("bnaudit-watch"),
    force: ForceOpt = False,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 when the script succeeds but a finding is at or "
                                         "above: error, warning, info, never.")] = "never",
    select: Annotated[list[str] | None, typer.Option("--select", help="Rules to check: codes, prefixes or names.")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Rules to skip: codes, prefixes or names.")] = None,
    every: Annotated[int, typer.Option("--every", min=1, help="Record one optimizer step in every N.")] = 1,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Layers to record: names or globs "
                                                        "(default: normalization, Linear/Conv, activations).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop recording a model after N "
                                                     "steps; the script runs on unrecorded.")] = None,
    reduce: Annotated[bool, typer.Option("--reduce", help="Under torchrun: merge statistics across ranks each step.")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Write no PNG plots (no matplotlib needed).")] = False,
) -> None:
    """Run a training script unchanged and audit its normalization while it trains.

    Finds each trained model from its optimizer.step() calls, records every layer across steps, flags evaluation
    passes without model.eval() (BN306), training left in eval mode (BN307), short batches (BN202), the first
    NaN/Inf (BN209), drift, scale and dead units, each with the step and your script's file:line. Writes
    report.json, report.html, the history and plots to --out. Exit status: the script's own (or 1 with
    --fail-on when the script succeeded but findings reach it; 2 for bad bnaudit options).

    [bold]Example[/]: bnaudit watch examples/watch_train.py --epochs 3
    """
    if fail_on not in FAIL_ON_CHOICES:
        raise UsageError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON_CHOICES)}")
    from bnaudit.files import OutputPlan
    from bnaudit.watching import Watch, finish, run_program
    from bnaudit.watching.outputs import fresh_folder

    probe = OutputPlan()
    probe.folder(fresh_folder(out, force=force), ["report.json"], label="--out", replace=force)
    probe.check()  # refuse an unwritable folder before the script runs, not after
    w = Watch(layers=split_list(layers) or None, every=every, max_steps=max_steps, reduce=reduce,
              select=split_list(select), ignore=split_list(ignore))
    with contextlib.redirect_stdout(stdout()), w:  # the script's stdout is the real one
        outcome = run_program(script, list(args or []), module=module)
    folder, code = None, None
    if w.rank == 0:
        program = {"command": " ".join([*(["-m"] if module else []), script, *(args or [])]),
                   "exit_code": outcome.code, "outcome": _outcome_text(outcome)}
        try:
            folder = w.write(out, force=force, program=program, plots=not no_plots)
        except BnauditError as exc:
            typer.echo(f"bnaudit: error: the report was not written: {exc}", err=True)
            code = exc.exit_code
        from rich.console import Console

        _summary(w, folder, Console(file=sys.stderr, highlight=False))
    status = finish(outcome)
    if status == 0 and code is not None:
        status = code
    if status == 0 and any(r.fails(fail_on) for r in w.reports):
        status = 1
    raise typer.Exit(status)


def _outcome_text(outcome: Any) -> str:
    if outcome.interrupted:
        return "interrupted"
    if outcome.failed:
        return f"raised {type(outcome.exc).__name__}"
    if outcome.exc is not None:
        return f"sys.exit({outcome.exc.code!r})"
    return "finished"
