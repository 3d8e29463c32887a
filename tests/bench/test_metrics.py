"""Bandwidth, copy shares and speed-ups, including derive() over a synthetic run."""

import pytest

from bench import impls
from bench.metrics import bandwidth_share, best, copy_share, derive, gbps, median, speedup
from bench.runner import new_record
from bench.shapes import Shape


def test_scalar_math():
    assert gbps(2e9, 1e6) == pytest.approx(2.0)  # 2 GB in 1 s
    assert gbps(33_554_432, 16.7) == pytest.approx(2009.25, rel=1e-4)
    assert gbps(1, None) is None and gbps(1, 0.0) is None
    # same bytes: the share is the ratio of times (copy 16.7 us, op 20 us -> 83.5 %)
    assert copy_share(20.0, 16.7) == pytest.approx(0.835)
    assert copy_share(None, 16.7) is None and copy_share(20.0, None) is None
    assert bandwidth_share(2e9, 1e6, 4.0) == pytest.approx(0.5)
    assert bandwidth_share(2e9, 1e6, None) is None
    assert speedup(30.0, 10.0) == pytest.approx(3.0)
    assert speedup(None, 10.0) is None and speedup(3.0, None) is None
    assert best([("a", 3.0), ("b", None), ("c", 2.0)]) == ("c", 2.0)
    assert best([("a", None)]) == (None, None)
    assert median([3.0, 1.0, 2.0, 100.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def _rec(name, shape, op, cold, warm, status="ok"):
    rec = new_record(impls.BY_NAME[name], shape, op, "bf16")
    rec.update(cold_us=cold, warm_us=warm, status=status)
    if status != "ok":
        rec["reason"] = "not here"
    return rec


def test_derive_shares_and_speedups():
    s = Shape(2048, 4096)
    nbytes = 2 * s.numel * 2
    records = [
        _rec("torch_eager", s, "fwd", 60.0, 40.0),
        _rec("torch_rms_norm", s, "fwd", 30.0, 20.0),
        _rec("liger", s, "fwd", None, None, status="missing"),
        _rec("accel_torch", s, "fwd", 20.0, 10.0),
        _rec("jax_xla", s, "fwd", 25.0, 16.0),
        _rec("flax_linen", s, "fwd", 50.0, 12.0),
        _rec("accel_jax", s, "fwd", 24.0, 9.0),
    ]
    floors = [
        {
            "framework": "torch",
            "shape": s.name,
            "op": "fwd",
            "bytes": nbytes,
            "cold_us": 16.7,
            "warm_us": 8.6,
        },
        {
            "framework": "jax",
            "shape": s.name,
            "op": "fwd",
            "bytes": nbytes,
            "cold_us": 18.0,
            "warm_us": 9.0,
        },
    ]
    derive(records, floors, ref_gbps=3000.0)
    r = {rec["impl"]: rec for rec in records}

    acc = r["accel_torch"]
    assert acc["cold_gbps"] == pytest.approx(nbytes / 20.0 / 1e3)
    assert acc["cold_copy_share"] == pytest.approx(16.7 / 20.0)
    assert acc["warm_copy_share"] == pytest.approx(8.6 / 10.0)
    assert acc["cold_big_copy_share"] == pytest.approx(nbytes / 20.0 / 1e3 / 3000.0)
    assert acc["cold_vs_torch_eager"] == pytest.approx(3.0)
    assert acc["warm_vs_torch_eager"] == pytest.approx(4.0)
    # best torch peer: F.rms_norm (liger missing; accel_torch is never its own peer)
    assert acc["cold_best_peer"] == "torch_rms_norm"
    assert acc["cold_vs_best_peer"] == pytest.approx(1.5)
    # a peer's best peer is the fastest *other* peer of its framework
    assert r["torch_rms_norm"]["cold_best_peer"] == "torch_eager"
    assert r["torch_rms_norm"]["cold_vs_best_peer"] == pytest.approx(2.0)

    # JAX: quoted against the JAX copy, peers are JAX peers only (accel_jax excluded)
    aj = r["accel_jax"]
    assert aj["cold_copy_share"] == pytest.approx(18.0 / 24.0)
    assert aj["cold_best_peer"] == "jax_xla"
    assert aj["cold_vs_best_peer"] == pytest.approx(25.0 / 24.0)
    assert aj["warm_best_peer"] == "flax_linen"
    assert aj["warm_vs_best_peer"] == pytest.approx(12.0 / 9.0)
    assert aj["cold_vs_torch_eager"] == pytest.approx(60.0 / 24.0)
    assert r["jax_xla"]["cold_best_peer"] == "flax_linen"

    miss = r["liger"]
    assert miss["cold_gbps"] is None and miss["cold_copy_share"] is None
    assert miss["cold_vs_torch_eager"] is None


def test_derive_without_floor_or_eager():
    s = Shape(4, 8)
    records = [_rec("accel_torch", s, "fused", 5.0, None)]
    derive(records, [], ref_gbps=None)
    rec = records[0]
    assert rec["cold_gbps"] == pytest.approx(4 * 32 * 2 / 5.0 / 1e3)
    assert rec["cold_copy_share"] is None
    assert rec["cold_big_copy_share"] is None
    assert rec["cold_vs_torch_eager"] is None and rec["cold_vs_best_peer"] is None
    assert rec["warm_gbps"] is None
