"""``bnaudit check`` (the YAML-configured CI gate) and ``bnaudit init`` (writes a commented starter config).

``check`` reads bnaudit.yaml (or --config), lays the command-line flags over it, runs every audit through
``bnaudit.checking.run_checks``, prints the report in --format on stdout, writes the config's ``outputs:``,
prints a one-line verdict on stderr, and exits 0 (pass), 1 (new findings at or above fail_on) or 2 (bad
config or input). torch is imported only once a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli.app import command, plan_outputs, print_stdout, stdout
from bnaudit.cli.options import ForceOpt, split_list
from bnaudit.errors import UsageError
from bnaudit.findings import FAIL_ON_CHOICES


@command("check")
def check_cmd(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config file (default: ./bnaudit.yaml).")
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option("--fail-on", help="Override the file's fail_on: error, warning, info or never."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="Report on stdout: auto, rich, json, sarif, junit, github or markdown.")
    ] = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the --format report to this file instead of stdout.")
    ] = None,
    select: Annotated[
        list[str] | None, typer.Option("--select", help="Rules to run (replaces the file's rules.select).")
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Rules to skip (added to the file's rules.ignore).")
    ] = None,
    audit: Annotated[
        list[str] | None, typer.Option("--audit", help="Run only the audit with this name (repeatable).")
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Accept the findings recorded in this baseline file.")
    ] = None,
    no_baseline: Annotated[
        bool, typer.Option("--no-baseline", help="Ignore the config's baseline: judge every finding.")
    ] = False,
    write_baseline: Annotated[
        Path | None,
        typer.Option("--write-baseline", help="Record today's findings in this file and exit 0 (needs --force to "
                     "replace one)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Run the audits in bnaudit.yaml and fail when findings reach fail_on: the CI gate.

    Exit status: 0 passed, 1 new findings at or above fail_on, 2 bad config or input. With a baseline only findings not recorded in it count. The config's [bold]outputs:[/] (SARIF, JUnit, ...) are written on every run.

    [bold]Example[/]: bnaudit check --format sarif -o bnaudit.sarif --fail-on warning
    """
    from bnaudit.config import find_config, load_config
    from bnaudit.report import render, resolve_format

    if fail_on is not None and fail_on not in FAIL_ON_CHOICES:
        raise UsageError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON_CHOICES)}")
    if baseline is not None and (no_baseline or write_baseline is not None):
        raise UsageError("--baseline cannot be combined with --no-baseline or --write-baseline; pick one")
    concrete = resolve_format(fmt)  # validate before the (slow) audits run
    if config is None:
        config = find_config(".")
        if config is None:
            raise UsageError("no bnaudit.yaml in this folder; run `bnaudit init` to write one, or pass --config FILE")
    cfg = load_config(config).override(
        fail_on=fail_on, select=split_list(select), ignore=split_list(ignore), baseline=baseline,
        audits=split_list(audit),
    )
    # Every output is checked before the audits run, not after minutes of work, and none may replace a file
    # this run reads: the config and what it extends, the models and data, the baseline being read.
    use_baseline = not no_baseline and write_baseline is None
    plan = plan_outputs([x for a in cfg.audits for x in (a.model, a.data, a.predict, a.weights)])
    plan.protect(*cfg.sources, cfg.baseline if use_baseline else None)
    plan.file(output, label="--output", replace=force)
    plan.file(write_baseline, label="--write-baseline", replace=force)
    if write_baseline is None:
        for i, spec in enumerate(cfg.outputs):
            plan.file(spec.path, label=f"outputs[{i}] ({spec.format})", replace=spec.overwrite,
                      why_not="its outputs: entry says overwrite: false, which --force does not change; remove "
                      "the file or the entry's overwrite: false" if not spec.overwrite else "")
    plan.check()

    from bnaudit.checking import run_checks

    if write_baseline is not None:
        from bnaudit.baseline import render_baseline

        result = run_checks(cfg, use_baseline=False)
        plan.commit({write_baseline: render_baseline(result.reports)})
        n = len(result.findings)
        typer.echo(f"wrote {write_baseline}: {n} finding{'s' if n != 1 else ''} accepted; later runs of "
                   f"`bnaudit check --baseline {write_baseline}` fail only on new ones", err=True)
        return

    result = run_checks(cfg, use_baseline=use_baseline)
    from bnaudit.report.sarif import artifact_uri

    opts = {
        "fail_on": cfg.fail_on,
        "default_uri": artifact_uri(str(config)),
        "always_list": True,
        "extra": {"check": {"fail_on": cfg.fail_on, "failed": result.failed, "accepted": len(result.accepted),
                            "stale_baseline_entries": result.stale}},
    }
    files = {spec.path: render(result.reports, spec.format, **opts) for spec in cfg.outputs}
    color = output is None and concrete == "rich" and stdout().isatty()
    text = render(result.reports, concrete, color=color, **opts)
    if output is not None:
        files[output] = text
    plan.commit(files)  # the report files as one set: all written or none
    if output is None:
        print_stdout(text)
    typer.echo(result.summary(), err=True)
    if result.failed:
        raise typer.Exit(1)


@command("init")
def init_cmd(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("bnaudit.yaml"),
    preset: Annotated[str, typer.Option("--preset", help="Preset the config extends: default or strict.")] = "default",
    force: ForceOpt = False,
) -> None:
    """Write a commented starter bnaudit.yaml for `bnaudit check`.

    [bold]Example[/]: bnaudit init --preset strict
    """
    from bnaudit.config import starter_config

    text = starter_config(preset)
    plan = plan_outputs()
    plan.file(path, label="PATH", replace=force)
    plan.check()
    plan.commit({path: text})
    typer.echo(f"wrote {path}; edit its audits: entry, then run `bnaudit check`", err=True)
