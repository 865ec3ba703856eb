"""The model's output layers, found on the layer graph (``LayerGraph.output_layers``), and BN206 passing over
them in ``inspect``: a classifier's logits drift as it learns, which is the training working."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.graph import build_graph
from bnaudit.recording.measures import drift_all
from tests.fixtures.drifting import digits_standardized, sigmoid_mlp, train_on_shifting_inputs


class _Net(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.tail = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3), tail

    def forward(self, x):
        return self.tail(self, self.bn(self.fc1(x)))


@pytest.mark.parametrize(("tail", "outputs"), [
    (lambda m, h: m.fc2(h), {"fc2"}),
    (lambda m, h: nn.functional.log_softmax(m.fc2(torch.relu(h)), 1), {"fc2"}),  # the PyTorch MNIST example
    (lambda m, h: torch.sigmoid(m.fc2(h)).squeeze(1), {"fc2"}),
    (lambda m, h: h, {"bn"}),  # ends in a BatchNorm: the walk stops at its parameters
    (lambda m, h: m.fc2(h) + h[:, :3], set()),  # combined with another layer's output: neither is the output
    (lambda m, h: torch.cat([m.fc2(h), h], 1), set()),
    (lambda m, h: (m.fc2(h), h), {"fc2", "bn"}),  # two outputs
])
@pytest.mark.parametrize("prefer", ["fx", "hooks"])
def test_output_layers_through_one_input_operations(tail, outputs, prefer):
    torch.manual_seed(0)
    graph = build_graph(_Net(tail), torch.randn(4, 8), prefer=prefer)
    assert graph.output_layers() == outputs


def test_output_layers_walk_back_through_parameter_free_modules():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Flatten(), nn.LogSoftmax(dim=1))
    assert build_graph(model, torch.randn(4, 8)).output_layers() == {"2", "3", "4"}


def test_bn206_in_inspect_passes_over_the_logits_and_still_reports_the_hidden_layers():
    # inputs that shift as it trains: every layer drifts past 1 std, the logits (layer "4") too
    model = sigmoid_mlp()
    with bnaudit.record(model) as rec:
        train_on_shifting_inputs(model, after_step=rec.step)
    shifts = {k: d.shift for k, d in drift_all(rec.history).items()}
    assert all(shifts[k] > 1.0 for k in "01234"), shifts
    report = bnaudit.inspect(model, digits_standardized(64)[0], select=["BN206"], history=rec.history)
    assert [f.layer for f in report.findings] == ["0", "1", "2", "3"]
    assert {f.evidence["layers_over"] for f in report.findings} == {4}
