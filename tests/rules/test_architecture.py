"""BN1xx findings looked at from inside: BN104 reports each Dropout once, with every BatchNorm it reaches, and
stops at the first normalization (a layer, a functional norm, a softmax) on each path. The generic example
test (tests/rules/test_examples.py) covers fire/no-fire of every rule's own cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bnaudit
from bnaudit.graph import build_graph
from bnaudit.rules import examples_architecture as A
from tests.fixtures.architectures import BY_NAME


def _bn104(model: nn.Module, x: torch.Tensor):
    return [f for f in bnaudit.inspect(model, x, select=["BN104"]).findings if f.code == "BN104"]


def test_one_finding_per_dropout_listing_every_batchnorm_it_reaches():
    (f,) = _bn104(A.TwoBranches(), A.x())
    assert f.layer == "drop" and f.severity == "warning"
    assert f.evidence["batchnorms"] == ["bn_a", "bn_b"] and f.evidence["path"] == ["a"] and f.evidence["p"] == 0.3
    assert "2 BatchNorm layers" in f.message and f.fix.startswith("move drop after the last BatchNorm")


class _ThroughANorm(nn.Module):
    """One dropout: straight into one BatchNorm's Linear, and through a LayerNorm into another's."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.direct, self.bn_direct = nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8)
        self.pre, self.ln = nn.Linear(10, 8), nn.LayerNorm(8)
        self.after, self.bn_after = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(x)
        return self.bn_direct(self.direct(h)) + self.bn_after(self.after(self.ln(self.pre(h))))


def test_the_path_stops_at_the_first_normalization():
    (f,) = _bn104(_ThroughANorm(), A.x())
    assert f.evidence["batchnorms"] == ["bn_direct"]


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.dropout(self.fc(x), 0.2, self.training))


def test_a_functional_dropout_is_reported_at_the_batchnorm_it_feeds():
    (f,) = _bn104(_FunctionalDropout(), A.x())
    assert f.layer == "bn" and f.evidence["dropout"] == "F.dropout" and f.evidence["batchnorms"] == ["bn"]


def test_maxvit_relative_position_dropouts_reach_later_batchnorms_only_through_softmax():
    # 14 relative-position MLPs, each with a Dropout(0.125), upstream of the pre-norm BatchNorms of every later
    # MBConv through the residual stream, but only as attention logits: the softmax stops the variance shift.
    arch = BY_NAME["maxvit"]
    model = arch.build()
    graph = build_graph(model, arch.example())
    drops = [n for n, node in graph.nodes.items() if isinstance(node.module, nn.Dropout) and "rel_pos" in n]
    assert len(drops) == 14
    unstopped = {d for d, _ in graph.downstream(drops[0], through=lambda n: True)}
    assert {"stages.0.1.conv.pre_norm", "stages.1.4.conv.pre_norm"} <= unstopped
    assert _bn104(model, arch.example()) == []
