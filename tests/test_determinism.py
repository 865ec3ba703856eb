"""Same input, same report: ``bnaudit.inspect`` with data gives identical findings and evidence whatever torch's
thread count and however busy the machine.

The model is a CIFAR-style ResNet-18 layout (a 3x3 stem, four stages of two BasicBlocks, 1x1 downsample
shortcuts; channels divided by 8) trained for a few steps from a fixed seed on sklearn's digits, upsampled to
3x32x32, and audited at batch 128 as in the report that BN203 flickered on a busy machine. The audit runs at 1
thread, at 2, and at 1 while another process spins on a core, and the JSON reports must be equal. (At fewer
threads than cores the recorder reduces on a thread of its own beside the forward pass: the run most exposed to
timing. Two torch threads beside a spinning process would measure OpenMP's waiting, tens of seconds.) BN203
and BN207 are set to report on every layer, so that their statistics are compared too, not only the rules
that happen to fire. What this caught: the probe recorded one BatchNorm's input statistics for another
(a shortcut's for the block's bn1) in random batches, depending on the allocator."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bnaudit
from bnaudit.findings import Finding, round_significant
from tests.fixtures.architectures import BasicBlock, ResNet

# Make every data rule that measures something per layer say it, so its numbers are compared too.
REPORT_EVERYTHING = {
    "BN203": {"options": {"max_mean_noise": 0.0}},
    "BN207": {"options": {"max_ratio": 1.0, "min_layers": 2}},
}
BUSY_FOR_S = 300  # an upper bound: the busy process is killed as soon as the audit is done


def _digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained_resnet18():
    x, y = _digits_images()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded machine two threads spend most of their time waiting for each other
    try:
        return _train(x, y), (x, y)
    finally:
        torch.set_num_threads(threads)


def _train(x: torch.Tensor, y: torch.Tensor) -> ResNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResNet(BasicBlock, widths=(8, 16, 32, 64))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(10):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _busy_process() -> subprocess.Popen:
    spin = f"import time\nend = time.monotonic() + {BUSY_FOR_S}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", spin])


def _audit(model, data) -> dict:
    report = bnaudit.inspect(model, data, batch_size=128, rule_config=REPORT_EVERYTHING)
    return json.loads(json.dumps(report.to_dict(), sort_keys=True))


def test_inspect_with_data_is_the_same_at_any_thread_count_and_load(trained_resnet18, restore_threads):
    model, data = trained_resnet18
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reports = {}
    torch.set_num_threads(1)
    reports["1 thread"] = _audit(model, data)
    torch.set_num_threads(2)
    reports["2 threads"] = _audit(model, data)
    torch.set_num_threads(1)
    busy = _busy_process()
    try:
        reports["1 thread, busy"] = _audit(model, data)
        assert busy.poll() is None, "the busy process ended before the audit did"
    finally:
        busy.kill()
        busy.wait()

    first = reports["1 thread"]
    bn = [f for f in first["findings"] if f["code"] == "BN203"]
    assert len(bn) == 20, [f["layer"] for f in bn]  # every BatchNorm reports its statistic
    assert any(f["code"] == "BN207" for f in first["findings"])
    floats = [v for f in first["findings"] for v in f["evidence"].values() if isinstance(v, float)]
    assert len(floats) > 150  # the comparison below is about numbers, not only about which rules fired
    for name, report in reports.items():
        assert report["findings"] == first["findings"], name
        assert report == first, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    # The issue's symptom: a healthy batch-128 ResNet measures about 0.01, far below BN203's 0.3. With a
    # shortcut's statistics mixed into a bn1 (the bug above) this model measured 0.30 at layers.2.0.bn1.
    assert max(f["evidence"]["mean_noise_median"] for f in bn) < 0.1
    assert max(f["evidence"]["mean_noise_lower"] for f in bn) < 0.3


def test_json_evidence_is_rounded_to_significant_digits():
    # BN304's loss ratio on its own example, measured at 1 and at 2 threads: it differs in the 7th digit.
    at_1, at_2 = 27.840515721276713, 27.840513406633853
    one, two = (Finding("BN304", "x", "warning", None, "m", "f", {"loss_ratio": v, "tiny": v * 1e-9})
                for v in (at_1, at_2))
    assert one.to_dict()["evidence"] == two.to_dict()["evidence"] == {"loss_ratio": 27.84, "tiny": 2.784e-08}
    assert one.evidence["loss_ratio"] == at_1  # the Python object keeps full precision
    assert round_significant(123456.7) == 123500.0 and round_significant(0.0) == 0.0
    assert math.isnan(round_significant(float("nan"))) and round_significant(float("-inf")) == float("-inf")
