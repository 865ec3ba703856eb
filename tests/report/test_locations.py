"""Source lines for line-based report formats: each layer points at the line of the model's file that
creates it, found by reading the file, never by running it again."""

from __future__ import annotations

import json
import textwrap

import bnaudit
from bnaudit.report import render
from bnaudit.report.locations import layer_lines

MODEL = textwrap.dedent('''\
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 16)
            self.bn = nn.BatchNorm1d(16)
            self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
            self.head: nn.Module = nn.Linear(16, 3)

        def forward(self, x):
            x = self.bn(self.stem(x))
            for b in self.blocks:
                x = b(x)
            return self.head(x)


    def build_net():
        return Net()


    def build_seq():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
    ''')


def _write(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODEL)
    return path


def test_class_attributes_sequential_entries_and_fallbacks(tmp_path):
    path = _write(tmp_path)
    report = bnaudit.inspect(f"{path}:build_net", None, input_shape="8", select=["BN101"])
    lines = report.source_lines
    assert lines[""] == 20  # def build_net
    assert (lines["stem"], lines["bn"], lines["head"]) == (8, 9, 11)
    assert lines["blocks"] == 10 and lines["blocks.0"] == 10 and lines["blocks.1"] == 10  # built in a loop
    (f,) = report.findings
    assert f.layer == "stem" and report.line_of(f.layer) == 8

    seq = bnaudit.inspect(f"{path}:build_seq", None, input_shape="8", select=["BN101"])
    assert seq.source_lines[""] == 24
    assert [seq.source_lines[str(i)] for i in range(4)] == [27, 28, 29, 30]
    sarif = json.loads(render([seq], "sarif", root=tmp_path))
    (result,) = sarif["runs"][0]["results"]
    region = result["locations"][0]["physicalLocation"]["region"]
    assert result["properties"]["layer"] == "0" and region == {"startLine": 27}
    github = render([seq], "github", root=tmp_path)
    assert github.startswith("::warning file=models.py,line=27,")


def test_no_lines_outside_a_python_file_or_for_code_defined_elsewhere(tmp_path):
    from torch import nn

    path = _write(tmp_path)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())  # defined here, not in models.py
    assert layer_lines(model, path) == {}
    assert layer_lines(model, tmp_path / "model.pt") == {}
    assert layer_lines(model, None) == {}
    report = bnaudit.inspect(model, None, input_shape="8", select=["BN101"])
    assert report.source_path is None and report.line_of("0") == 1
