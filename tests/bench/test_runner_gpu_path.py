"""The runner's GPU code path, driven on the CPU with fake device timers.

torch's do_bench / CUDA-graph timers and the CUPTI profiler are replaced by fakes that
really call the measured functions and return fixed times, so the plumbing (floors per
framework, cold and warm per implementation, flush separation, peak memory, host
overhead, derived shares, the schema) is checked without a GPU. No real timing here.
"""

import jax
import pytest

from bench import jax_timing, report, runner, timing
from bench.shapes import parse_shapes

FLUSH_KERNEL = ("loop_xor_fusion", 0.150)


def fake_measure(f, *, aggregate=True, iterations=1):
    """CUPTI stand-in: one 'op' kernel of 4 us per call; a flush kernel where there is one."""
    assert aggregate is False

    def wrapper(*args):
        out = jax.block_until_ready(f(*args))
        flush = args and args[0].size == runner.MIN_FLUSH_BYTES // 4 and args[1].ndim == 0
        if flush and len(args) == 2:
            recs = [FLUSH_KERNEL]
        elif flush:
            recs = [FLUSH_KERNEL, ("op", 0.004)]
        else:
            recs = [("op", 0.004)]
        return out, (recs if iterations == 1 else [list(recs) for _ in range(iterations)])

    return wrapper


@pytest.fixture
def fake_gpu(monkeypatch):
    import torch

    calls = {"cold": 0, "warm": 0}

    def cold(fn, *a, **k):
        fn()
        calls["cold"] += 1
        return 10.0

    def warm(fn, *a, **k):
        fn()
        calls["warm"] += 1
        return 6.0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(timing, "cuda_cold_us", cold)
    monkeypatch.setattr(timing, "cuda_warm_us", warm)
    monkeypatch.setattr(timing, "torch_peak_bytes", lambda fn: (fn(), 4096)[1])
    monkeypatch.setattr(jax_timing, "load_profiler", lambda: (fake_measure, None))
    monkeypatch.setattr(runner, "_jax_reason", lambda on_gpu: None)
    monkeypatch.setattr(runner, "MIN_FLUSH_BYTES", 1 << 16)
    monkeypatch.setattr(runner, "BIG_COPY_BYTES", 1 << 20)  # not 1 GiB on this CPU
    monkeypatch.setattr(
        runner,
        "device_info",
        lambda: {
            "kind": "cuda",
            "name": "Fake H100",
            "l2_bytes": None,
            "memory_bytes": None,
            "sm_count": None,
        },
    )
    # tensors stay on the CPU: the fake "GPU" is the CPU
    init = runner._Torch.__init__

    def cpu_torch(self, on_gpu, reps):
        init(self, on_gpu, reps)
        self.device = "cpu"

    monkeypatch.setattr(runner._Torch, "__init__", cpu_torch)
    monkeypatch.setattr(runner._Torch, "release", lambda self: None)
    return calls


def test_gpu_path_end_to_end(fake_gpu):
    logs = []
    cfg = runner.Config(
        shapes=parse_shapes("4x32,2x64"),
        ops=["fwd", "fused", "fwdbwd"],
        dtype="fp32",
        impls="torch_eager,torch_rms_norm,liger,jax_xla,flax_linen",
        quick=True,
        log=logs.append,
    )
    res = runner.run(cfg)
    assert report.validate(res) == []
    assert res["device"]["kind"] == "cuda" and res["timing"]["cold"] == timing.COLD_METHOD
    assert any(line.startswith("[2/2] 2x64 done") for line in logs)
    # reference copy: the (here 1 MiB instead of 1 GiB) buffer copy, timed cold (fake 10 us)
    big = res["copy_bandwidth"]
    assert big["bytes_moved"] == 2 << 20 and big["us"] == 10.0
    assert big["gbps"] == pytest.approx((2 << 20) / 10.0 / 1e3)

    floors = {(f["framework"], f["shape"], f["op"]): f for f in res["floors"]}
    assert len(floors) == 2 * 2 * 3
    assert floors[("torch", "4x32", "fwd")]["cold_us"] == 10.0
    assert floors[("jax", "4x32", "fwd")]["cold_us"] == pytest.approx(4.0)  # flush dropped

    by = {(r["impl"], r["shape"], r["op"]): r for r in res["records"]}
    eager = by[("torch_eager", "2x64", "fwdbwd")]
    assert (eager["status"], eager["cold_us"], eager["warm_us"]) == ("ok", 10.0, 6.0)
    assert eager["peak_mem_bytes"] == 4096 and eager["cold_copy_share"] == pytest.approx(1.0)
    assert by[("liger", "4x32", "fwd")]["status"] == "missing"
    for name in ("jax_xla", "flax_linen"):
        rec = by[(name, "4x32", "fused")]
        assert rec["status"] == "ok", rec
        assert rec["cold_us"] == pytest.approx(4.0) and rec["warm_us"] == pytest.approx(4.0)
        assert rec["kernels"] == ["op"] and rec["notes"] == []
        assert rec["cold_vs_torch_eager"] == pytest.approx(2.5)
        assert by[(name, "2x64", "fwdbwd")]["peak_mem_bytes"] > 0
    # every torch cell was timed both ways (2 floors-worth of copies included)
    assert fake_gpu["cold"] >= 2 * 2 * 3 and fake_gpu["warm"] >= 2 * 2 * 3
    host = {(h["impl"], h["op"]) for h in res["host_overhead"] if h["status"] == "ok"}
    assert ("jax_xla", "fwdbwd") in host and ("torch_rms_norm", "fused") in host


def test_gpu_path_reports_jax_missing_without_profiler(fake_gpu, monkeypatch):
    monkeypatch.setattr(jax_timing, "load_profiler", lambda: (None, "no CUPTI here"))
    cfg = runner.Config(
        shapes=parse_shapes("2x32"),
        ops=["fwd"],
        dtype="fp32",
        impls="torch_eager,jax_xla",
        quick=True,
        host_overhead=False,
        log=lambda m: None,
    )
    res = runner.run(cfg)
    rec = {r["impl"]: r for r in res["records"]}
    assert rec["jax_xla"]["status"] == "missing" and "no CUPTI here" in rec["jax_xla"]["reason"]
    assert "no wall-clock fallback" in rec["jax_xla"]["reason"]
    assert rec["torch_eager"]["status"] == "ok"
    assert report.validate(res) == []
