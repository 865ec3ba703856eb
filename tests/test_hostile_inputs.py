"""Hostile-but-realistic input, one table row per case (issue #15).

Every row is a command run on a fresh copy of one workspace of hostile files (models that exit, print or
parse sys.argv; NaN, one-sample, mislabelled, random-byte, header-only and special-file data; configs whose
outputs name their inputs), with the exit status it must give, the first words its stderr must start with,
and the files that must stay byte-identical. For every row, whatever it is:

- no traceback on stdout or stderr, and an exit-2 row prints exactly one line on stderr;
- every file of the workspace that existed before is byte-identical after, unless the row names it;
- a failed row leaves no new file at all (no partial output set, no temporary file), and a passing row
  creates only the files it names;
- a row run in a subprocess (``sub=True``, for memory, signals and real exit codes) peaks below 2 GiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnaudit.cli import app

# FIFOs, /proc (to follow workers) and a /sys folder no user can write to: Linux only.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the hostile workspace needs Linux")

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "bnaudit" / "gate" / "presets" / "default.yaml"
PEAK_LIMIT = 2 << 30
TC = ["--steps", "2", "--seeds", "1", "--lr", "0.1", "-q", "--no-record"]  # the smallest train-compare run

MODELS = {
    "fine.py": """
        import torch
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

        def build_data():
            g = torch.Generator().manual_seed(0)
            return torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    """,
    "mlp.py": """
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    """,
    "conv.py": """
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    """,
    "conv64.py": """
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(64 * 6 * 6, 2))
    """,
    "wide.py": """
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
    """,
    "exits_factory.py": """
        import sys

        def build_model():
            sys.exit(0)
    """,
    "exits_import.py": """
        import sys
        sys.exit(0)
    """,
    "exits_forward.py": """
        import sys
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                sys.exit(0)

        def build_model():
            return Net()
    """,
    "baddata.py": """
        import sys
        import torch
        from torch import nn
        from torch.utils.data import Dataset

        class Corrupt(Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                if i == 5:
                    raise ValueError("corrupt record 5")
                return torch.randn(4), 0

        class Exits(Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, i):
                sys.exit(3)

        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

        def build_data():
            return Corrupt()

        def exits_data():
            return Exits()

        def broken_stream():
            yield torch.randn(8, 4)
            raise RuntimeError("stream broke")
    """,
    "argv_model.py": """
        import argparse
        from torch import nn

        parser = argparse.ArgumentParser()
        parser.add_argument("--lr", type=float, default=0.1)
        args = parser.parse_args()

        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    """,
    "printing.py": """
        from torch import nn

        print("hello from import")

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                print("forward!")
                return self.fc(x)

        def build_model():
            print("building")
            return Net()
    """,
}

CONFIGS = {
    "gate.yaml": """
        fail_on: info
        audits:
          - {name: exits, model: exits_factory.py:build_model}
          - {name: good, model: fine.py:build_model}
        outputs:
          - {format: junit, path: junit.xml}
    """,
    "outputs_py.yaml": """
        audits: [fine.py:build_model]
        outputs:
          - {format: json, path: fine.py}
    """,
    "outputs_self.yaml": """
        audits: [fine.py:build_model]
        outputs:
          - {format: sarif, path: outputs_self.yaml}
    """,
    "keep.yaml": """
        audits: [fine.py:build_model]
        outputs:
          - {format: json, path: report.json, overwrite: false}
    """,
    "with_baseline.yaml": """
        audits: [fine.py:build_model]
        baseline: base.json
    """,
    "child.yaml": """
        extends: parent.yaml
        audits: [fine.py:build_model]
    """,
    "parent.yaml": """
        fail_on: error
    """,
    "data_out.yaml": """
        audits:
          - {model: mlp.py:build_model, data: xy.pt}
        outputs:
          - {format: json, path: xy.pt}
    """,
    "twice.yaml": """
        audits: [fine.py:build_model]
        outputs:
          - {format: json, path: r.json}
          - {format: sarif, path: r.json}
    """,
    "good.yaml": """
        audits: [fine.py:build_model]
        outputs:
          - {format: json, path: r.json}
          - {format: junit, path: j.xml}
    """,
    "nofolder.yaml": """
        audits: [fine.py:build_model]
        outputs:
          - {format: junit, path: j.xml}
          - {format: json, path: out/r.json}
    """,
}


def _build_workspace(root: Path) -> None:
    for name, text in {**MODELS, **CONFIGS}.items():
        (root / name).write_text(textwrap.dedent(text).lstrip())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.save((x, y), root / "xy.pt")
    torch.save((torch.randn(64, 7, generator=g), y), root / "xy_wrong.pt")
    bad = x.clone()
    bad[40, 2] = float("nan")
    torch.save((bad, y), root / "xy_nan.pt")
    torch.save((x[:1], y[:1]), root / "one.pt")
    torch.save((torch.randn(2000, 32, generator=g), torch.randint(0, 3, (2000,), generator=g)), root / "big_xy.pt")
    np.savez(root / "lp.npz", labels=y.numpy(), pixels=x.numpy())
    (root / "rand.pt").write_bytes(bytes(range(256)) * 16)
    (root / "header.csv").write_text("a,b,c,d,label\n")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 3)).state_dict(), root / "w.pt")
    (root / "report.json").write_text('{"kept": true}\n')
    (root / "base.json").write_text('{"bnaudit_baseline": 1, "findings": []}\n')
    (root / "plots").mkdir()
    (root / "plots" / "loss.png").write_bytes(b"\x89PNG not really")
    (root / "big.yaml").write_text("# " + "a" * (2 << 20) + "\n")
    (root / "victim.py").write_text((root / "mlp.py").read_text())


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-template")
    _build_workspace(root)
    return root


@pytest.fixture
def ws(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    os.mkfifo(root / "fifo.pt")  # made per copy: copying a FIFO would block on reading it
    (root / "urandom.yaml").symlink_to("/dev/urandom")
    monkeypatch.chdir(root)
    return root


@dataclass(frozen=True)
class Case:
    """One hostile input.

    Attributes:
        id: the row's name: the issue's defect number and what it tries.
        args: bnaudit's arguments; ``{ws}`` is the workspace, ``{preset}`` a preset shipped in bnaudit.
        code: the exit status it must give.
        stderr: the words stderr must start with ("" for anything).
        keep: files that must stay byte-identical (besides every other file of the workspace).
        creates: files a passing row writes (nothing else may appear).
        sub: run ``python -m bnaudit`` in a subprocess and measure its peak memory.
        check: more assertions on (stdout, stderr, workspace).
        terminate: send SIGTERM once the process has this many children (then expect exit 143).
    """

    id: str
    args: tuple[str, ...]
    code: int
    stderr: str
    keep: tuple[str, ...] = ()
    creates: tuple[str, ...] = ()
    sub: bool = False
    check: Callable[[str, str, Path], None] | None = None
    terminate: int = 0
    env: dict[str, str] = field(default_factory=dict)


def _json_report(codes: set[str], not_skipped: str = "") -> Callable[[str, str, Path], None]:
    def check(stdout: str, stderr: str, ws: Path) -> None:
        report = json.loads(stdout)  # nothing but the report on stdout
        assert codes <= {f["code"] for f in report["findings"]}, report["findings"]
        assert not_skipped not in json.dumps(report.get("rules_skipped", {})) if not_skipped else True

    return check


def _prints_on_stderr(stdout: str, stderr: str, ws: Path) -> None:
    json.loads(stdout)
    assert "forward!" in stderr and "hello from import" in stderr and "forward!" not in stdout


def _no_usage(stdout: str, stderr: str, ws: Path) -> None:
    assert "usage:" not in stderr and "unrecognized arguments" not in stderr


E = "bnaudit: error: "
CASES = [
    # 1. sys.exit in user code: a clean exit-2 error naming the file, never a silent pass.
    Case("1-check-gate-exit-in-factory", ("check", "-c", "gate.yaml"), 2,
         E + "gate.yaml:3: audits[0].model: audit 'exits': exits_factory.py:build_model: building the model "
         "called sys.exit(0)"),
    Case("1-check-gate-real-process", ("check", "-c", "gate.yaml"), 2,
         E + "gate.yaml:3: audits[0].model: audit 'exits':", sub=True),
    Case("1-inspect-exit-at-import", ("inspect", "exits_import.py"), 2,
         E + "exits_import.py: importing exits_import.py called sys.exit(0)"),
    Case("1-inspect-exit-in-forward", ("inspect", "exits_forward.py", "--input-shape", "4"), 2, E + "{ws}/exits_forward.py:"),
    Case("1-fold-bn-exit-in-factory", ("fold-bn", "exits_factory.py", "--input-shape", "4", "-o", "f.pt"), 2,
         E + "exits_factory.py: building the model called sys.exit(0)"),
    Case("1-train-compare-exit-in-factory", ("train-compare", "exits_factory.py", "--data", "xy.pt", *TC), 2,
         E + "exits_factory.py: building the model called sys.exit(0)"),
    Case("1-exit-in-dataset-getitem", ("inspect", "baddata.py", "--data", "baddata.py:exits_data"), 2,
         E + "baddata.py:exits_data: reading the data (batch 1) called sys.exit(3) at {ws}/baddata.py:"),
    Case("1-dataset-raises", ("inspect", "baddata.py"), 2,
         E + "{ws}/baddata.py:build_data: reading the data (batch 1) raised ValueError: corrupt record 5"),
    Case("1-generator-raises-later", ("inspect", "baddata.py", "--data", "baddata.py:broken_stream"), 2,
         E + "baddata.py:broken_stream: reading the data (batch 2) raised RuntimeError: stream broke"),
    Case("1-train-compare-dataset-raises", ("train-compare", "baddata.py", "-b", "8", *TC), 2,
         E + "reading the training data raised ValueError: corrupt record 5 at {ws}/baddata.py:"),
    # 2. no output replaces an input of the run; .py is never written; --force never beats overwrite: false.
    Case("2-check-output-named-model-py", ("check", "-c", "outputs_py.yaml"), 2,
         E + "outputs[0] (json) fine.py: bnaudit never writes a Python source file", keep=("fine.py",)),
    Case("2-check-output-named-its-config", ("check", "-c", "outputs_self.yaml"), 2,
         E + "outputs[0] (sarif) outputs_self.yaml is also an input", keep=("outputs_self.yaml",)),
    Case("2-check-force-vs-overwrite-false", ("check", "-c", "keep.yaml", "--force"), 2,
         E + "report.json already exists; its outputs: entry says overwrite: false", keep=("report.json",)),
    Case("2-check-output-is-baseline-read", ("check", "-c", "with_baseline.yaml", "-o", "base.json", "--force"), 2,
         E + "--output base.json is also an input", keep=("base.json",)),
    Case("2-check-output-is-extended-config", ("check", "-c", "child.yaml", "-o", "parent.yaml", "--force"), 2,
         E + "--output parent.yaml is also an input", keep=("parent.yaml",)),
    Case("2-check-output-is-audit-data", ("check", "-c", "data_out.yaml"), 2,
         E + "outputs[0] (json) xy.pt is also an input", keep=("xy.pt",)),
    Case("2-check-output-is-a-preset", ("check", "-c", "good.yaml", "-o", "{preset}", "--force"), 2, E + "--output",
         keep=("{preset}",)),
    Case("2-check-two-outputs-one-path", ("check", "-c", "twice.yaml"), 2, E + "outputs[0] (json) and outputs[1]"),
    Case("2-check-writes-its-set", ("check", "-c", "good.yaml", "-f", "json"), 0, "", creates=("r.json", "j.xml")),
    Case("2-check-missing-output-folder", ("check", "-c", "nofolder.yaml"), 2, E + "folder out does not exist"),
    Case("2-insert-bn-over-its-source", ("insert-bn", "victim.py", "-o", "victim.py", "--force", "--input-shape", "4"),
         2, E + "--output victim.py: bnaudit never writes a Python source file", keep=("victim.py",)),
    Case("2-insert-bn-over-its-weights", ("insert-bn", "mlp.py", "--weights", "w.pt", "-o", "w.pt", "--force",
                                          "--input-shape", "4"), 2, E + "--output w.pt is also an input", keep=("w.pt",)),
    Case("2-recalibrate-over-its-data", ("recalibrate", "mlp.py", "--data", "xy.pt", "-o", "xy.pt", "--force"), 2,
         E + "--output xy.pt is also an input", keep=("xy.pt",)),
    # A FIFO of the workspace, not /dev/null: before the fix this replaced the special file with a report.
    Case("2-inspect-over-a-special-file", ("inspect", "mlp.py", "-o", "fifo.pt", "--force"), 2,
         E + "--output fifo.pt is not a regular file"),
    Case("2-init-over-a-preset", ("init", "{preset}", "--force"), 2, E + "PATH {preset} is inside bnaudit",
         keep=("{preset}",)),
    Case("2-init-as-python", ("init", "setup.py"), 2, E + "PATH setup.py: bnaudit never writes a Python source file"),
    # 3. a folder that cannot be written: one line, not a PermissionError traceback; --plot folders are created.
    Case("3-inspect-read-only-folder", ("inspect", "mlp.py", "-o", "/sys/kernel/report.txt"), 2,
         E + "--output /sys/kernel/report.txt: cannot write in folder /sys/kernel"),
    Case("3-insert-bn-read-only-folder", ("insert-bn", "mlp.py", "--input-shape", "4", "-o", "/sys/kernel/m.pt"), 2,
         E + "--output /sys/kernel/m.pt: cannot write in folder"),
    Case("3-train-compare-plot-read-only", ("train-compare", "fine.py", *TC, "--plot", "/sys/kernel/plots"), 2,
         E + "--plot /sys/kernel/plots: cannot write in folder /sys/kernel"),
    Case("3-train-compare-html-read-only", ("train-compare", "fine.py", *TC, "--html", "/sys/kernel/r.html"), 2,
         E + "--html /sys/kernel/r.html: cannot write in folder"),
    Case("3-init-read-only-folder", ("init", "/sys/kernel/bnaudit.yaml"), 2, E + "PATH /sys/kernel/bnaudit.yaml: cannot write"),
    Case("3-train-compare-creates-plot-folder", ("train-compare", "fine.py", "-b", "8", *TC, "--plot", "new/plots", "-o", "t.txt"),
         0, "", creates=("new/plots/loss.png", "new/plots/accuracy.png", "new/plots/grad_norms.png", "t.txt")),
    # 4. torch errors in train-compare become one line.
    Case("4-batch-size-1-on-batchnorm", ("train-compare", "fine.py", "--data", "xy.pt", "-b", "1", *TC), 2,
         E + "the 'baseline' variant has BatchNorm (1), which cannot train on batches of one example"),
    Case("4-val-data-of-another-shape", ("train-compare", "fine.py", "--data", "xy.pt", "--val-data", "xy_wrong.pt",
                                         "-b", "8", *TC), 2, E + "--val-data examples have shape (7,)"),
    Case("4-negative-momentum", ("train-compare", "fine.py", "--momentum", "-1", "-b", "8", *TC), 2,
         E + "--momentum -1.0: SGD momentum must be"),
    # 5. NaN data: an error naming the first bad batch or example, nothing written.
    Case("5-recalibrate-nan-data", ("recalibrate", "mlp.py", "--data", "xy_nan.pt", "-o", "r.pt"), 2,
         E + "xy_nan.pt: batch 2 holds a non-finite input"),
    Case("5-train-compare-nan-data", ("train-compare", "mlp.py", "--data", "xy_nan.pt", "-b", "8", *TC), 2,
         E + "the training data's inputs hold 1 non-finite value (NaN); the first is in example 40"),
    # 6. a one-sample (x, y) pair is a pair.
    Case("6-inspect-one-sample-pair", ("inspect", "fine.py", "--data", "one.pt", "-f", "json", "--fail-on", "never"),
         0, "", check=_json_report({"BN202"}, not_skipped="internal error")),
    Case("6-train-compare-one-sample-pair", ("train-compare", "fine.py", "--data", "one.pt", "-b", "1", *TC), 2,
         E + "cannot carve a 20% validation split out of 1 examples"),
    # 7. a model file that parses sys.argv sees only its own path.
    Case("7-argparse-at-import", ("inspect", "argv_model.py", "--input-shape", "4", "--select", "BN1"), 0, "",
         check=_no_usage),
    # 8. sizes checked before allocating; config files read with a cap; nothing past 2 GiB.
    Case("8-random-batches-only-as-used", ("inspect", "conv.py", "--data", "random:3x224x224", "-b", "256", "--steps",
                                           "1", "--fail-on", "never"), 0, "", sub=True),
    Case("8-batch-of-fifty-million", ("inspect", "mlp.py", "--data", "random:4", "-b", "50000000"), 2,
         E + "random:4 at batch size 50000000 would need 763 MiB, more than 256 MiB", sub=True),
    Case("8-huge-sample-shape", ("inspect", "mlp.py", "--data", "random:100000x100000"), 2,
         E + "random:100000x100000 at batch size 32 would need 1.16 TiB", sub=True),
    Case("8-huge-input-shape", ("fold-bn", "mlp.py", "--input-shape", "100000x100000", "--dry-run"), 2,
         E + "--input-shape 100000x100000 (4 samples) would need"),
    Case("8-batch-size-above-maxsize", ("inspect", "fine.py", "--data", "xy.pt", "-b", str(2**70), "--fail-on",
                                        "never"), 0, "", sub=True),
    Case("8-config-links-to-urandom", ("check", "-c", "urandom.yaml"), 2, E + "urandom.yaml: cannot be read (not a "
         "regular file", sub=True),
    Case("8-config-of-two-mebibytes", ("check", "-c", "big.yaml"), 2, E + "big.yaml is larger than 1 MiB"),
    Case("8-nproc-16", ("train-compare", "fine.py", "--nproc", "16", "-b", "2", *TC), 2,
         E + "--nproc 16 (16 processes of about", sub=True),
    Case("8-memory-limit-from-env", ("inspect", "mlp.py", "--data", "random:4", "-b", "4096"), 2,
         E + "random:4 at batch size 4096 would need 64 KiB, more than 12.5 KiB", env={"BNAUDIT_MEMORY_LIMIT": "100K"}),
    # 9. all outputs or none.
    Case("9-existing-plot-blocks-before-json", ("train-compare", "fine.py", *TC, "-o", "new.json", "-f", "json",
                                                "--plot", "plots"), 2, E + "plots/loss.png already exists",
         keep=("plots/loss.png",)),
    Case("9-sigterm-during-workers", ("train-compare", "wide.py", "--data", "big_xy.pt", "--workers", "2", "--steps",
                                      "100000", "--seeds", "2", "-q"), 143, E + "terminated", sub=True, terminate=2),
    # 10. bad values refused, the report keeps stdout, files said for what they are.
    Case("10-lr-nan", ("train-compare", "fine.py", "-b", "8", *TC[:4], "--lr", "nan", "-q"), 2,
         E + "--lr nan: a learning rate must be a positive finite number"),
    Case("10-lr-overflows", ("train-compare", "fine.py", "-b", "8", *TC[:4], "--lr", "1e400", "-q"), 2,
         E + "--lr inf: a learning rate must be"),
    Case("10-epochs-nan", ("train-compare", "fine.py", "-b", "8", "--epochs", "nan", "--seeds", "1", "-q"), 2,
         E + "epochs must be a positive finite number, got nan"),
    Case("10-target-loss-nan", ("train-compare", "fine.py", "-b", "8", *TC, "--target-loss", "nan"), 2,
         E + "--target-loss nan: give a finite number"),
    Case("10-groups-divide-nothing", ("swap-norm", "conv64.py", "--to", "group", "--groups", "7", "--input-shape",
                                      "3x8x8", "-o", "gn.pt"), 2, E + "--groups 7 divides none of the BatchNorm"),
    Case("10-unit-out-of-range", ("train-compare", "fine.py", "-b", "8", *TC[:-1], "--unit", "9999"), 2,
         E + "--unit 9999: the input of 2 has 8 units"),
    Case("10-npz-without-input-key", ("inspect", "mlp.py", "--data", "lp.npz"), 2,
         E + "lp.npz: holds ['labels', 'pixels'] and none is named like inputs"),
    Case("10-npz-with-input-key", ("inspect", "mlp.py", "--data", "lp.npz", "--input-key", "pixels", "--fail-on",
                                   "never"), 0, ""),
    Case("10-model-prints-json-report", ("inspect", "printing.py", "--input-shape", "4", "-f", "json"), 0, "",
         check=_prints_on_stderr),
    Case("10-random-bytes-pt", ("inspect", "rand.pt"), 2, E + "rand.pt: not a file torch.save wrote"),
    # lesser
    Case("L-out-of-range-option", ("inspect", "mlp.py", "--steps", "0"), 2, E + "Invalid value for '--steps'"),
    Case("L-unknown-option", ("inspect", "mlp.py", "--bogus"), 2, E + "No such option: --bogus"),
    # In a real process: pytest would catch numpy's warning that used to come before the error line.
    Case("L-header-only-csv", ("inspect", "mlp.py", "--data", "header.csv"), 2, E + "header.csv: header.csv has no rows",
         sub=True),
    Case("L-fifo-as-data", ("inspect", "mlp.py", "--data", "fifo.pt"), 2, E + "fifo.pt: fifo.pt is not a regular file"),
    Case("L-fifo-as-model", ("inspect", "fifo.pt"), 2, E + "model fifo.pt is not a regular file"),
    Case("L-dev-zero-as-data", ("inspect", "mlp.py", "--data", "/dev/zero"), 2,
         E + "/dev/zero: /dev/zero is not a regular file"),
    Case("L-input-shape-named-not-inferred", ("inspect", "mlp.py", "--input-shape", "7"), 2,
         E + "mlp.py: the model rejected its example input (random (4, 7) from --input-shape)"),
]


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts or p.is_symlink() or not p.is_file():
            continue
        out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


_MEASURED = """
import os, resource, runpy, sys
sys.argv = ["bnaudit", *sys.argv[1:]]
try:
    runpy.run_module("bnaudit", run_name="__main__", alter_sys=True)
finally:
    kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    with open(os.environ["BNAUDIT_TEST_PEAK"], "w") as fh:
        fh.write(str(kb * 1024))
"""


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _subprocess(case: Case, args: list[str], ws: Path) -> tuple[int, str, str]:
    env = {**os.environ, **case.env, "PYTHONPATH": str(ROOT), "BNAUDIT_TEST_PEAK": str(ws.parent / "peak")}
    proc = subprocess.Popen([sys.executable, "-c", _MEASURED, *args], cwd=ws, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: list[int] = []
    if case.terminate:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < case.terminate and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are training
        workers = _children(proc.pid)
        assert len(workers) >= case.terminate, "the workers never started"
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    peak = int((ws.parent / "peak").read_text())
    assert peak < PEAK_LIMIT, f"peak memory {peak / 2**30:.2f} GiB"
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived bnaudit"
    return proc.returncode, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, ws: Path) -> None:
    def fill(text: str) -> str:
        return text.replace("{ws}", str(ws)).replace("{preset}", str(PRESET))

    args = [fill(a) for a in case.args]
    keep = [Path(fill(k)) for k in case.keep]
    kept = {k: (ws / k).read_bytes() for k in keep}
    before = _hashes(ws)
    if case.sub:
        code, out, err = _subprocess(case, args, ws)
    else:
        for name, value in case.env.items():
            os.environ[name] = value
        try:
            result = CliRunner().invoke(app, args)
        finally:
            for name in case.env:
                os.environ.pop(name, None)
        code, out, err = result.exit_code, result.stdout, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out + err, err
    assert code == case.code, (code, err[-2000:])
    assert err.startswith(fill(case.stderr)), err
    if code == 2:
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    for k, data in kept.items():
        assert (ws / k).read_bytes() == data, f"{k} was changed"
    after = _hashes(ws)
    changed = [f for f, h in before.items() if after.get(f) != h]
    assert not changed, f"files changed or removed: {changed}"
    new = sorted(set(after) - set(before))
    assert new == sorted(case.creates if code == 0 else ()), new
    if case.check is not None:
        case.check(out, err, ws)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder; /sys rows cover root")
def test_read_only_folder_for_a_normal_user(ws: Path) -> None:
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for args in (["inspect", "mlp.py", "-o", "ro/r.txt"], ["init", "ro/bnaudit.yaml"],
                     ["train-compare", "fine.py", *TC, "--plot", "ro/plots"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and result.stderr.startswith(E) and "cannot write" in result.stderr
    finally:
        ro.chmod(0o755)
