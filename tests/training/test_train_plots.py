"""Plots and the HTML report of a real (tiny) comparison: every figure is a PNG, the HTML embeds them and
escapes text, and a missing matplotlib gives the install hint instead of an ImportError."""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import pytest
from torch import nn

from bnaudit.errors import OutputError, UsageError
from bnaudit.report import html as html_report
from bnaudit.report.plots import PALETTE, figures, focus_setting, write_plots
from bnaudit.training import train_compare
from bnaudit.training.table import markdown_table, summary_rows


@pytest.fixture(scope="module")
def result(small_digits):
    return train_compare(
        lambda: nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 10)),
        small_digits,
        variants=("baseline", "bn"),
        lrs=[0.5, 200.0],
        seeds=[0, 1],
        steps=30,
        threads=1,
        ics_layer="2",
    )


@pytest.fixture(scope="module")
def pngs(result):
    return figures(result)  # drawn once; matplotlib is the slow part of these tests


def ink(png: bytes, colour: str) -> float:
    """Fraction of the image's pixels drawn in ``colour``: a curve drawn in it covers far more than the
    short line of its legend entry (about 0.0002 of these figures)."""
    import matplotlib.image as mpimg
    import numpy as np
    from matplotlib.colors import to_rgb

    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    return float((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < 0.02).mean())


def test_figures_are_pngs(result, pngs):
    assert set(pngs) == {"loss", "accuracy", "grad_norms", "percentiles", "drift", "ics"}
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in pngs.values())
    # every figure has its curves, not just axes and labels: baseline and bn are drawn in their own colours
    baseline, bn = PALETTE[0], PALETTE[1]
    for name in ("loss", "accuracy", "percentiles", "ics"):
        assert ink(pngs[name], baseline) > 0.001 and ink(pngs[name], bn) > 0.001, name
    for name in ("grad_norms", "drift"):  # one colour per layer; the first layer's is the first colour
        assert ink(pngs[name], PALETTE[0]) > 0.001, name
    # lr 200 diverges for every variant and seed, so the per-layer figures focus on lr 0.5
    assert all(c.diverged == c.seeds for c in result.cells if c.lr == 200.0)
    assert focus_setting(result) == (0.5, 64)


def test_write_plots_refuses_to_overwrite(result, pngs, tmp_path: Path):
    written = write_plots(result, tmp_path / "p", pngs=pngs)
    assert len(written) == 6
    assert (tmp_path / "p" / "loss.png").read_bytes() == pngs["loss"]
    with pytest.raises(OutputError, match="already exists"):
        write_plots(result, tmp_path / "p", pngs=pngs)
    assert len(write_plots(result, tmp_path / "p", force=True, pngs=pngs)) == 6
    # A missing plot folder is created, parents and all (issue #15).
    assert len(write_plots(result, tmp_path / "missing" / "p", pngs=pngs)) == 6
    assert (tmp_path / "missing" / "p" / "loss.png").read_bytes() == pngs["loss"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_plots(result, tmp_path / "file", pngs=pngs)


def test_html_is_self_contained(result, pngs):
    page = html_report.render(result, title="<digits>", pngs=pngs)
    assert page.startswith("<!DOCTYPE html>")
    assert "&lt;digits&gt;" in page and "<digits>" not in page
    assert page.count('src="data:image/png;base64,') == 6
    assert "http://" not in page and "https://" not in page  # nothing external
    assert 'class="best"' in page
    for line in result.verdict:
        assert html_report.html.escape(line) in page


def test_summary_rows_and_markdown(result):
    rows = summary_rows(result)
    assert len(rows) == 4
    assert [r.cells[0] for r in rows] == ["baseline", "bn", "baseline", "bn"]
    md = markdown_table(result)
    assert md.splitlines()[0].startswith("| variant | lr | batch |") and "**" in md


def test_missing_matplotlib_names_the_extra(result, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError, match=r"pip install 'bnaudit\[plot\]'"):
        figures(result)
