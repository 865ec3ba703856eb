"""``bnaudit check`` (the YAML-configured CI gate) and ``bnaudit init`` (writes a commented starter config).

``check`` reads bnaudit.yaml (or --config), lays the command-line flags over it, runs every audit through
``bnaudit.check`` (``bnaudit.gate.run_checks``), prints the report in --format on stdout, writes the config's ``outputs:``,
prints a one-line verdict on stderr, and exits 0 (pass), 1 (new findings at or above fail_on) or 2 (bad
config or input). torch is imported only once a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit.cli.app import command, plan_outputs, print_stdout, stdout
from bnaudit.cli.options import ForceOpt, split_list
from bnaudit.errors import UsageError


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
    from bnaudit.api.gate import gate_config
    from bnaudit.report import render, resolve_format

    if baseline is not None and (no_baseline or write_baseline is not None):
        raise UsageError("--baseline cannot be combined with --no-baseline or --write-baseline; pick one")
    concrete = resolve_format(fmt)  # validate before the (slow) audits run
    cfg = gate_config(config, fail_on=fail_on, select=split_list(select), ignore=split_list(ignore),
                      baseline=baseline, audits=split_list(audit))
    use_baseline = not no_baseline and write_baseline is None
    plan = _plan(cfg, use_baseline, output, write_baseline, force)

    from bnaudit.api import check

    if write_baseline is not None:
        from bnaudit.gate import render_baseline

        result = check(cfg, use_baseline=False)
        plan.commit({write_baseline: render_baseline(result.reports)})
        n = len(result.findings)
        typer.echo(f"wrote {write_baseline}: {n} finding{'s' if n != 1 else ''} accepted; later runs of "
                   f"`bnaudit check --baseline {write_baseline}` fail only on new ones", err=True)
        return

    result = check(cfg, use_baseline=use_baseline)
    opts = render_options(result, cfg.path)
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


def _plan(cfg: Any, use_baseline: bool, output: Path | None, write_baseline: Path | None, force: bool) -> Any:
    """Every output, checked before the audits run (not after minutes of work); none may replace a file this
    run reads: the config and what it extends, the models and data, the baseline being read."""
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
    return plan


def render_options(result: Any, config_path: Path | None) -> dict[str, Any]:
    """The renderer options of a gate report: the verdict in the JSON and the config as SARIF's default URI."""
    from bnaudit.report.sarif import artifact_uri

    return {
        "fail_on": result.config.fail_on,
        "default_uri": artifact_uri(str(config_path)),
        "always_list": True,
        "extra": {"check": {"fail_on": result.config.fail_on, "failed": result.failed,
                            "accepted": len(result.accepted), "stale_baseline_entries": result.stale}},
    }


@command("init")
def init_cmd(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("bnaudit.yaml"),
    preset: Annotated[str, typer.Option("--preset", help="Preset the config extends: default or strict.")] = "default",
    force: ForceOpt = False,
) -> None:
    """Write a commented starter bnaudit.yaml for `bnaudit check`.

    [bold]Example[/]: bnaudit init --preset strict
    """
    from bnaudit.gate import starter_config

    text = starter_config(preset)
    plan = plan_outputs()
    plan.file(path, label="PATH", replace=force)
    plan.check()
    plan.commit({path: text})
    typer.echo(f"wrote {path}; edit its audits: entry, then run `bnaudit check`", err=True)
