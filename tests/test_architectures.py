"""`inspect` on architectures built the way popular ones are: no false warnings on the correct ones, the
graph method honest about fx, and the user's model untouched."""

from __future__ import annotations

import pytest
import torch

import bnaudit
from bnaudit.graph import OUTPUT, build_graph
from tests.fixtures.architectures import ARCHITECTURES, BY_NAME


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.correct], ids=lambda a: a.name)
def test_inspect_correct_architectures_raise_no_warning(arch):
    model = arch.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    report = bnaudit.inspect(model, arch.example(), select=["BN1"])
    loud = [f for f in report.findings if f.severity in ("warning", "error")]
    assert not loud, [(f.code, f.layer, f.message) for f in loud]
    assert not any("internal error" in why for why in report.rules_skipped.values()), report.rules_skipped
    assert report.graph_method == ("fx" if arch.traceable else "hooks"), report.graph_note
    assert report.layers and all(layer.calls >= 1 for layer in report.layers if layer.input_shapes)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]


# Warnings on correct fixtures that are true, each checked by a test of its own:
# BN202 judges the batch the test chose (4 samples give a BatchNorm at 1x1 spatial size 4 values per
# channel); BN208 on vgg11: its fresh unnormalized classifier sees the same input whatever the image, so more
# than half its ReLU units are dead on every input (test_fresh_vgg_without_bn_has_truly_dead_classifier_units).
TRUE_WARNINGS = {"BN202": {a.name for a in ARCHITECTURES}, "BN208": {"vgg11"}}


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_inspect_with_data_on_fresh_models(arch):
    # Every fixture is freshly initialised, so no error-level finding is ever right, and on a correct model
    # no warning either (BN1xx wiring, BN2xx data, BN3xx modes and statistics) beyond the true ones above.
    # The data rules decide with a margin for their estimation noise at these 4 random samples (BN203, BN205).
    # The served model is inspected with its predict().
    model = arch.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    report = bnaudit.inspect(model, arch.example(), predict=arch.predict)
    assert not [c for c, why in report.rules_skipped.items() if "internal error" in why], report.rules_skipped
    errors = [(f.code, f.layer, f.message) for f in report.findings if f.severity == "error"]
    assert not errors
    if arch.correct:
        loud = [(f.code, f.layer, f.message) for f in report.findings
                if f.severity == "warning" and arch.name not in TRUE_WARNINGS.get(f.code, ())]
        assert not loud
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and flags == [m.training for m in model.modules()]


def test_fresh_vgg_without_bn_has_truly_dead_classifier_units():
    # BN208 on vgg11 is not small-sample noise: the same units are dead on 4 and on 64 images, because the
    # fresh unnormalized features barely vary between images (PyTorch's default init shrinks the signal layer by
    # layer), so each classifier unit's sign is set by its bias, not by the input.
    from bnaudit.loading.data import Batch
    from bnaudit.probes.data import run_data_probe
    from tests.fixtures.architectures import images

    model = BY_NAME["vgg11"].build()
    dead = {n: run_data_probe(BY_NAME["vgg11"].build(), [Batch(images(n), None)]).dead for n in (4, 64)}
    assert dead[4]["classifier.1"] == dead[64]["classifier.1"] and dead[4]["classifier.1"][0] > 32
    with torch.no_grad():
        pre = model.classifier[0](torch.flatten(model.avgpool(model.features(images(64))), 1))
    assert float(pre.std(0).max()) < 0.01 * float(pre.mean(0).abs().median())
    report = bnaudit.inspect(model, images(4), select=["BN208"])
    assert sorted(f.layer for f in report.findings) == ["classifier.1", "classifier.4"]


@pytest.mark.parametrize(("name", "kind"), [("rmsnorm_cnn", "rms"), ("evonorm_cnn", "evo"), ("evonorm_b0_cnn", "evo")])
def test_models_normalized_by_classes_torch_does_not_define(name, kind):
    # timm's RmsNorm2d and EvoNorm layers: six convolutions, each normalized, so no BN110 "no normalization"
    arch = BY_NAME[name]
    report = bnaudit.inspect(arch.build(), arch.example(), select=["BN1"])
    assert "BN110" in report.rules_run and not report.findings, [(f.code, f.message) for f in report.findings]
    assert [layer.normalization for layer in report.layers if layer.normalization] == [kind] * 6


def test_unnormalized_vgg_is_told_about_batchnorm():
    report = bnaudit.inspect(BY_NAME["vgg11"].build(), BY_NAME["vgg11"].example(), select=["BN110"])
    assert [f.code for f in report.findings] == ["BN110"]
    assert report.findings[0].evidence["hidden_layers"] == 10  # 8 convs + 2 hidden Linear layers


@pytest.mark.parametrize("name", ["resnet_basic", "early_exit_cnn"])
def test_fx_and_hooks_agree_on_dataflow_between_modules(name):
    arch = BY_NAME[name]
    model = arch.build()
    hooks = build_graph(model, arch.example(), prefer="hooks")
    assert hooks.method == "hooks"
    # Every BatchNorm is fed by the convolution before it, and the head feeds the output.
    for node in hooks.nodes.values():
        if isinstance(node.module, torch.nn.BatchNorm2d):
            srcs = {e.src for e in hooks.parents(node.name)}
            assert any(isinstance(hooks.module(s), torch.nn.Conv2d) for s in srcs), (node.name, srcs)
    assert {e.src for e in hooks.parents(OUTPUT)} & {"fc", "head"}
    if arch.traceable:
        fx = build_graph(model, arch.example(), prefer="fx")
        key = lambda g: {(e.src, e.dst) for e in g.edges if e.src in g.nodes and e.dst in g.nodes}  # noqa: E731
        assert key(fx) == key(hooks)


def test_call_counts_and_shapes_recorded():
    graph = build_graph(BY_NAME["densenet_block"].build(), BY_NAME["densenet_block"].example())
    assert graph.nodes["conv0"].input_shapes[0] == (4, 3, 32, 32)
    assert graph.nodes["norm5"].input_shapes[0] == (4, 20, 16, 16)
    assert all(n.calls == 1 for n in graph.nodes.values())
    # The concatenation feeding norm5 comes from the stem's pool and all three dense layers.
    srcs = {e.src for e in graph.parents("norm5")}
    assert srcs == {"pool0", "block.0.conv2", "block.1.conv2", "block.2.conv2"}
