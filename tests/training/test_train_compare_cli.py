"""``bnaudit train-compare`` end to end through Typer's CliRunner on the bundled deep-sigmoid example (real
digits data), with tiny settings: JSON keys, table and verdict, plots and HTML, refusal to overwrite, and
input errors as one line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bnaudit.cli import app
from tests.training.conftest import EXAMPLES, RUN_KEYS

runner = CliRunner()
EXAMPLE = str(EXAMPLES / "deep_sigmoid_digits.py")
TINY = ["--lr", "2", "--steps", "20", "--seeds", "2", "--threads", "1"]


def test_json_output_and_plots_and_html(tmp_path: Path):
    out, plots, page = tmp_path / "r.json", tmp_path / "plots", tmp_path / "r.html"
    res = runner.invoke(
        app,
        [
            "train-compare",
            EXAMPLE,
            *TINY,
            "--format",
            "json",
            "-o",
            str(out),
            "--plot",
            str(plots),
            "--html",
            str(page),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["variants"] == ["baseline", "bn"] and data["settings"]["lrs"] == [2.0]
    assert data["settings"]["model"].endswith("deep_sigmoid_digits.py")
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        assert set(run) >= RUN_KEYS
        assert len(run["losses"]) == 20
    names = sorted(p.name for p in plots.iterdir())
    assert {"loss.png", "accuracy.png", "grad_norms.png", "percentiles.png", "drift.png"} <= set(names)
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(names)
    assert "<table>" in text and "Verdict" in text

    again = runner.invoke(app, ["train-compare", EXAMPLE, *TINY, "--format", "json", "-o", str(out)])
    assert again.exit_code == 2
    assert "already exists; pass --force" in again.output
    forced = runner.invoke(
        app, ["train-compare", EXAMPLE, *TINY, "--no-record", "--format", "json", "-o", str(out), "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert json.loads(out.read_text())["runs"][0]["drift"] is None


def test_table_output_has_summary_and_verdict():
    res = runner.invoke(app, ["train-compare", EXAMPLE, *TINY, "--no-record"])
    assert res.exit_code == 0, res.output
    assert "steps to target" in res.stdout and "baseline" in res.stdout and "bn" in res.stdout
    assert "- At lr 2: with bn" in res.stdout
    assert "runs in" in res.stdout and "s per run" in res.stdout


def test_input_errors_are_one_line():
    cases = [
        (["--lr", "fast"], "--lr takes numbers"),
        (["--variants", "baseline,batchnorm"], "unknown variant 'batchnorm'"),
        (["--format", "yaml"], "--format 'yaml'"),
        (["--target-loss", "low"], "--target-loss takes a number"),
        (["--steps", "5", "--epochs", "1"], "steps or epochs, not both"),
        (["--variants", "user"], "needs the changed model"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, ["train-compare", EXAMPLE, "--seeds", "1", "--steps", "2", *extra])
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
        assert "Traceback" not in res.output


def test_user_variant_from_a_second_model_file(tmp_path: Path):
    changed = tmp_path / "changed.py"
    changed.write_text(
        "from torch import nn\n"
        "def build_model():\n"
        "    layers, fan_in = [], 64\n"
        "    for _ in range(4):\n"
        "        layers += [nn.Linear(fan_in, 64), nn.BatchNorm1d(64), nn.Sigmoid()]\n"
        "        fan_in = 64\n"
        "    return nn.Sequential(*layers, nn.Linear(64, 10))\n"
    )
    res = runner.invoke(
        app,
        [
            "train-compare",
            EXAMPLE,
            *TINY,
            "--no-record",
            "--variants",
            "baseline,user",
            "--user-model",
            str(changed),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["variant"] for r in data["runs"]] == ["baseline", "baseline", "user", "user"]
    assert any("5/5 Linear/Conv layers start from the base model's weights" in n for n in data["notes"])


def test_cli_and_python_api_agree():
    from bnaudit.training import train_compare
    from tests.training.conftest import load_example

    res = runner.invoke(app, ["train-compare", EXAMPLE, *TINY, "--no-record", "--format", "json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    example = load_example("deep_sigmoid_digits")
    api = train_compare(example.build_model(), example.build_data(), lrs=[2.0], steps=20, seeds=2, record=False)
    assert [r["losses"] for r in cli["runs"]] == [[round(v, 6) for v in r.losses] for r in api.runs]
