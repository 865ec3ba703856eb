"""Two real processes in a gloo process group on CPU: reduced statistics equal single-process statistics of
the same global batch, and BN401/BN402/BN403 each fire on a scenario and stay quiet on its fix.

All scenarios share one spawn (``_worker.run``); each test reads what the ranks pickled. Skipped only
where torch.distributed or its gloo backend is unavailable."""

from __future__ import annotations

import pickle
import socket
import time

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import _worker

WORLD = 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gloo")
    init = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.start_processes(_worker.run, args=(WORLD, init, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process gloo session did not finish in 240 s (a collective is waiting)")
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    return results


def _scenario(ranks, name, rank=0):
    got = ranks[rank][name]
    assert "error" not in got, got.get("error")
    return got


def _codes(findings):
    return [f["code"] for f in findings]


# -- reduced statistics == single-process statistics of the global batch ----------------------------------------


def test_reduce_moments_equals_global_batch(ranks):
    for r in range(WORLD):
        got = _scenario(ranks, "moments", r)
        m, ref = got["moments"], got["moments_ref"]
        np.testing.assert_allclose(m["mean"], ref["mean"], rtol=1e-12)
        np.testing.assert_allclose(m["var"], ref["var"], rtol=1e-10)
        assert m["min"] == ref["min"] and m["max"] == ref["max"]
        assert float(np.asarray(m["count"]).max()) == 569 and m["numel"] == ref["numel"]
        assert m["zero_frac"] == pytest.approx(ref["zero_frac"])
    # every rank ends with bit-identical results (merged in rank order)
    assert np.array_equal(ranks[0]["moments"]["moments"]["var"], ranks[1]["moments"]["moments"]["var"])


def test_reduce_channel_stats_equals_global_batch(ranks):
    got = _scenario(ranks, "moments", 1)
    cs, ref = got["cs"], got["cs_ref"]
    assert cs["n"] == ref["n"] == 569
    np.testing.assert_allclose(cs["mean"], ref["mean"], rtol=1e-12)
    np.testing.assert_allclose(cs["var"], ref["var"], rtol=1e-10)
    np.testing.assert_array_equal(cs["min"], ref["min"])
    np.testing.assert_array_equal(cs["max"], ref["max"])
    np.testing.assert_array_equal(cs["nonzero"], ref["nonzero"])


def _assert_matches_reference(got: dict, where: str = "") -> None:
    """Every recorded layer's statistics equal the single-process reference's (see _worker._recorded_split)."""
    assert got["layers"] == got["ref_layers"] and len(got["layers"]) >= 3
    for layer in got["ref_layers"]:
        for stat in ("channel_mean", "channel_var", "mean", "var", "min", "max", "zero_frac"):
            np.testing.assert_allclose(got[(layer, stat)], got[(layer, stat, "ref")], rtol=2e-5, atol=1e-5,
                                       err_msg=f"{where}{layer} {stat}")
        np.testing.assert_array_equal(got[(layer, "count")], got[(layer, "count", "ref")])


def test_reduced_history_equals_single_process_history(ranks):
    got = _scenario(ranks, "recording")
    _assert_matches_reference(got)
    # the local (unreduced) history is rank 0's 24 of 64 samples: clearly different, so the check has teeth
    first = got["ref_layers"][0]
    assert not np.allclose(got[(first, "channel_mean", "local")], got[(first, "channel_mean", "ref")], rtol=1e-3)
    assert (got[(first, "count", "local")] == _worker.SPLIT).all()
    assert any("reduced across 2 ranks" in n for n in got["notes"])


def test_per_step_reduce_row_matches_history_reduction(ranks):
    got = _scenario(ranks, "recording", 1)
    np.testing.assert_allclose(got["row"], got["row_ref"], rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(got["row_ints"][:, 1], got["row_ints_ref"][:, 1])
    assert (got["row_ints"][:, 1] == _worker.GLOBAL).all()


def test_record_reduce_merges_every_step_across_ranks(ranks):
    # record(reduce=True) on 24 + 40 samples per step equals recording the 64-sample global batch, on each rank
    for rank in range(WORLD):
        got = _scenario(ranks, "record_reduce", rank)
        _assert_matches_reference(got, f"rank {rank} ")
        for layer in got["ref_layers"]:
            assert (got[(layer, "count")] == _worker.GLOBAL).all()


# -- BN401 ----------------------------------------------------------------------------------------------------


def test_bn401_fires_on_small_per_device_batch_and_not_on_fixes(ranks):
    got = _scenario(ranks, "small_batch")
    hits = [f for f in got["bn"] if f["code"] == "BN401"]
    assert [f["layer"] for f in hits] == ["1"]
    ev = hits[0]["evidence"]
    assert ev["samples_per_device"] == 8 and ev["world_size"] == 2 and ev["per_rank_samples"] == [8, 8]
    assert ev["global_samples"] == 16 and ev["planned"] is False
    assert "SyncBatchNorm" in hits[0]["fix"]
    assert "BN401" not in _codes(got["sync"])  # the fix: SyncBatchNorm
    assert "BN401" not in _codes(got["group"])  # the other fix: GroupNorm
    assert "BN401" not in _codes(got["large"])  # 32 samples per device
    assert _scenario(ranks, "small_batch", 1)["bn"] is None  # only rank 0 reports


# -- BN402 ----------------------------------------------------------------------------------------------------


def test_bn402_fires_on_divergent_buffers_and_not_when_broadcast(ranks):
    got = _scenario(ranks, "divergent")
    invalid, valid = got[("invalid", 0)], got[("valid", 0)]
    assert "BN402" not in got[("invalid", 0, "skipped")]
    assert got[("invalid", 0, "gap")] > 0.2 > got[("valid", 0, "gap")], (got[("invalid", 0, "gap")], got[("valid", 0, "gap")])
    hits = [f for f in invalid if f["code"] == "BN402"]
    assert [f["layer"] for f in hits] == ["1"]
    assert hits[0]["evidence"]["max_mean_gap"] > hits[0]["evidence"]["mean_tol"]
    assert "rank-0 checkpoint" in hits[0]["message"]
    assert "BN402" not in _codes(valid)
    ddp = [f for f in got["ddp"] if f["code"] == "BN402"]
    assert ddp and ddp[0]["evidence"]["forward_sync_buffers"] is False
    assert "broadcast_buffers=False" in ddp[0]["fix"]
    direct = [f for f in got["ddp_direct"] if f["code"] == "BN402"]
    assert direct and direct[0]["evidence"]["forward_sync_buffers"] is False


# -- BN403 ----------------------------------------------------------------------------------------------------


def test_bn403_syncbn_on_cpu_in_gloo_group(ranks):
    got = _scenario(ranks, "syncbn")
    hits = [f for f in got["cpu"] if f["code"] == "BN403"]
    assert hits and hits[0]["severity"] == "error" and "CPU" in hits[0]["message"]


def test_bn403_conversion_after_ddp_wrap(ranks):
    got = _scenario(ranks, "syncbn")
    assert got["late_facts"].converted_after_wrap and not got["plain_facts"].converted_after_wrap
    assert got["plain_facts"].forward_sync_buffers is True
    late = [f["message"] for f in got["late"] if f["code"] == "BN403"]
    assert any("converted after DistributedDataParallel wrapped" in m for m in late), late
    direct = [f["message"] for f in got["late_direct"] if f["code"] == "BN403"]
    assert any("converted after DistributedDataParallel wrapped" in m for m in direct), direct
    assert "BN403" not in _codes(got["plain"])  # the fix: no conversion behind DDP's back


# -- rank 0 reports, failures do not hang --------------------------------------------------------------------


def test_merge_reports_on_rank0(ranks):
    got = _scenario(ranks, "merging")
    merged = {f["message"]: f for f in got["merged"]}
    assert set(merged) == {"same on every rank", "only on rank 1"}
    assert "ranks" not in merged["same on every rank"]["evidence"]
    assert merged["only on rank 1"]["evidence"]["ranks"] == [1]
    assert got["meta"]["world_size"] == 2 and got["meta"]["backend"] == "gloo"
    assert _scenario(ranks, "merging", 1)["merged"] is None


def test_a_failing_rank_makes_every_rank_raise(ranks):
    r0, r1 = _scenario(ranks, "failures", 0), _scenario(ranks, "failures", 1)
    assert r0["bad_data"][0] == "DistributedError" and "rank 1" in r0["bad_data"][1]
    assert r1["bad_data"][0] == "DataError"
    assert r0["layout"] and r1["layout"] and "rank 1" in r0["layout"]
    assert r0["no_data"] and r1["no_data"] and "different audit" in r0["no_data"]


def test_full_audit_with_probes_runs_in_the_group(ranks):
    report = _scenario(ranks, "full_audit")["report"]
    assert _scenario(ranks, "full_audit", 1)["report"] is None
    assert {"BN401", "BN402", "BN403"} <= set(report["rules_run"])
    broken = {code: why for code, why in report["rules_skipped"].items() if "internal error" in why}
    assert not broken, broken
    assert report["meta"]["world_size"] == 2
    assert "BN401" in _codes(report["findings"])
