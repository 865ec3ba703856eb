"""Every MODEL / DATA / PREDICT spec form, loaded for real from files the test writes."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnaudit.errors import DataError, SpecError, WeightsError
from bnaudit.loading import as_source, load_data, load_model, load_predict

MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)
    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))

instance = Net()

def build_model():
    torch.manual_seed(0)
    return Net()

def build_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g)

def predict(model, inputs):
    model.eval()
    return model(inputs)

not_a_model = 42

def returns_list():
    return [1, 2]

def needs_args(width):
    return Net()

def raises():
    raise ValueError("no GPU here")

def empty_data():
    return torch.utils.data.TensorDataset(torch.zeros(0, 4))
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def test_model_spec_forms(model_file):
    by_default = load_model(str(model_file))
    assert type(by_default.module).__name__ == "Net" and by_default.namespace is not None
    assert by_default.source_path == model_file.resolve()
    assert type(load_model(f"{model_file}:instance").module).__name__ == "Net"
    assert type(load_model(f"{model_file}:Net").module).__name__ == "Net"  # a class is a zero-arg callable
    by_module = load_model("tests.fixtures.architectures:vgg11_bn")
    assert by_module.module.features[1].__class__ is nn.BatchNorm2d
    obj = nn.Linear(2, 2)
    assert load_model(obj).module is obj


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (":nothing", "has no model named 'nothing'"),
        (":not_a_model", "names a int, not an nn.Module"),
        (":returns_list", "returned a list, not a torch.nn.Module"),
        (":needs_args", "calling it with no arguments failed"),
        (":raises", "building the model raised ValueError: no GPU here"),
    ],
)
def test_model_spec_errors(model_file, suffix, message):
    with pytest.raises(SpecError, match=message):
        load_model(f"{model_file}{suffix}")


def test_missing_file_and_bad_spec(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_model(str(tmp_path / "nope.py"))
    with pytest.raises(SpecError, match="not a model spec"):
        load_model("just words")
    with pytest.raises(SpecError, match="no module named 'no_such_pkg'"):
        load_model("no_such_pkg.models:Net")


def test_weights_state_dict_and_mismatch(model_file, tmp_path):
    trained = load_model(str(model_file)).module
    with torch.no_grad():
        trained.fc.weight.fill_(0.5)
    good = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, good)
    loaded = load_model(str(model_file), weights=good).module
    assert torch.equal(loaded.fc.weight, trained.fc.weight)
    bad = tmp_path / "bad.pt"
    torch.save({"other.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="does not match the model"):
        load_model(str(model_file), weights=bad)
    with pytest.raises(WeightsError, match="not found"):
        load_model(str(model_file), weights=tmp_path / "missing.pt")


def test_pickled_module_needs_trust(model_file, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), path)
    with pytest.raises(SpecError, match="--trust-pickle"):
        load_model(str(path))
    assert isinstance(load_model(str(path), trust_pickle=True).module, nn.Sequential)
    sd = tmp_path / "sd.pt"
    torch.save(nn.Linear(3, 3).state_dict(), sd)
    with pytest.raises(SpecError, match="weights only"):
        load_model(str(sd))


def test_data_from_model_file_and_predict(model_file):
    loaded = load_model(str(model_file))
    source = load_data(None, namespace=loaded.namespace, batch_size=16)
    assert source.batch_size == 16 and source.dataset_len == 40 and source.shuffled is True
    assert source.smallest_batch == 8  # 40 % 16, drop_last off
    batch = source.first()
    assert batch.inputs.shape == (16, 4) and batch.targets.shape == (16,)
    assert load_predict(None, loaded.namespace).__name__ == "predict"
    assert load_predict(f"{model_file}:predict").__name__ == "predict"
    with pytest.raises(SpecError, match="no predict function named"):
        load_predict(f"{model_file}:nope")


def test_data_objects():
    x, y = torch.randn(10, 3), torch.arange(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    src = as_source(loader, "loader")
    assert (src.batch_size, src.dataset_len, src.drop_last, src.shuffled, src.smallest_batch) == (4, 10, True, False, 4)
    assert as_source(TensorDataset(x), "ds", batch_size=5).num_batches == 2
    assert as_source(x, "tensor", batch_size=3).first().inputs.shape == (3, 3)
    assert as_source((x.numpy(), y.numpy()), "pair", batch_size=10).first().targets.tolist() != []
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert len(list(as_source(batches, "list").batches())) == 2
    gen = as_source((b for b in batches), "generator")
    assert len(list(gen.batches())) == 2 and len(list(gen.batches())) == 2  # a one-shot iterator is cached
    dicts = [{"pixels": x[:5], "label": y[:5]}]
    with pytest.raises(DataError, match="--input-key"):
        as_source(dicts, "dicts")
    assert as_source(dicts, "dicts", input_key="pixels").first().targets.shape == (5,)
    with pytest.raises(DataError, match="empty"):
        as_source(TensorDataset(torch.zeros(0, 3)), "empty")
    with pytest.raises(DataError, match="yields no batches"):
        as_source([], "nothing")
    with pytest.raises(DataError, match="gives a str"):
        as_source("text", "text")


def test_data_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float64)
    y = np.arange(12) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    src = load_data(str(tmp_path / "d.npz"), batch_size=4)
    b = src.first()
    assert b.inputs.dtype == torch.float32 and b.inputs.shape == (4, 3) and b.targets is not None
    torch.save({"inputs": torch.from_numpy(x).float(), "labels": torch.from_numpy(y)}, tmp_path / "d.pt")
    assert load_data(str(tmp_path / "d.pt"), batch_size=6).first().inputs.shape == (6, 3)
    (tmp_path / "d.csv").write_text("age,income,label\n" + "\n".join(f"{20 + i},{1000 * i},{i % 2}" for i in range(9)))
    csv = load_data(str(tmp_path / "d.csv"), batch_size=9).first()
    assert csv.inputs.shape == (9, 2) and csv.targets.dtype == torch.long
    rnd = load_data("random:3x8x8", batch_size=5)
    assert rnd.first().inputs.shape == (5, 3, 8, 8) and rnd.num_batches == 8
    with pytest.raises(SpecError, match="not a shape"):
        load_data("random:3xZ")
    with pytest.raises(SpecError, match="not found"):
        load_data(str(tmp_path / "missing.npz"))
