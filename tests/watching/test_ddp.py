"""``torchrun --nproc_per_node 2 -m bnaudit watch --reduce ddp_train.py``: two real gloo processes; each rank
watches its own process, rank 0 alone writes the report, the DDP wrapper is unwrapped, and with ``--reduce``
the recorded statistics describe the global batch (2 x 32 samples)."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest
import torch.distributed as dist

from tests.watching.helpers import SCRIPTS, run

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_gloo_reduce(tmp_path):
    out = tmp_path / "ddp"
    got = run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "bnaudit", "watch",
               "--out", str(out), "--no-plots", "--reduce", str(SCRIPTS / "ddp_train.py"), "--steps", "6"],
              tmp_path, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "rank 0 done" in got.stdout and "rank 1 done" in got.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 wrote nothing
    report = json.loads((out / "report.json").read_text())
    (r,) = report["reports"]
    assert r["model"] == "BNMLP" and r["meta"]["steps"] == 6 and r["meta"]["rank"] == 0  # unwrapped from DDP
    from bnaudit.recording import History

    h = History.load(out / "BNMLP.history.pt")
    counts = h.series("net.1", "count")
    assert np.all(counts[1:] == 64)  # values per channel of the global batch: 2 ranks x 32 samples
