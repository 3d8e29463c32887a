"""GPU checks of the benchmark (skipped without CUDA).

- every peer the bench builds computes the benchmarked op at a real size (Liger and
  torch.compile included where installed), against float64 at fp32;
- ``python -m bench --quick`` at one real shape: every available implementation gets a
  cold and a warm device time, JAX through CUPTI with the flush kernel separated, and
  the JSON conforms. Timings are printed (run with -s), not asserted;
- the default output folder is this card's own, ``bench/results/<card>/``;
- the torch peers again at a model width that is not a power of two, and quack at bf16:
  its forward within 1 ulp of float64, its fused h the contract's (x + r rounded once) and
  its fused y within 1 ulp of float64 of the unrounded fp32 sum, as its op note says.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import impls, report
from bench.shapes import Shape
from tests.numerics.ulp import ulp_error

from .test_impls import EPS, check_jax_peer, check_torch_peer

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
SHAPE = Shape(2048, 4096)


def _gpu_impls(framework):
    out = []
    for impl in impls.REGISTRY:
        if impl.framework == framework:
            reason = impl.unavailable(on_gpu=True, requested=True)
            out.append(pytest.param(impl, marks=pytest.mark.skip(reason) if reason else ()))
    return out


@pytest.mark.parametrize("impl", _gpu_impls("torch"), ids=lambda i: i.name)
def test_torch_peers_on_gpu(impl):
    check_torch_peer(impl, SHAPE, "cuda", seed=5)


@pytest.mark.parametrize("impl", _gpu_impls("torch"), ids=lambda i: i.name)
def test_torch_peers_at_a_model_width_on_gpu(impl):
    check_torch_peer(impl, Shape(256, 3584), "cuda", seed=6)  # 3584 = 7 * 512


def _f64_rmsnorm(h, w):
    """float64 y of rows ``h`` (M, N) and weight ``w`` (N,), any float inputs."""
    h, w = h.double(), w.double()
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + EPS) * w


@pytest.mark.parametrize("impl", [p for p in _gpu_impls("torch") if p.values[0].name == "quack"])
def test_quack_bf16_rounds_as_its_op_notes_say(impl):
    shape = Shape(512, 7168)
    x, w = impls.torch_inputs("fwd", shape, "bf16", "cuda", seed=7)
    y = impl.build("fwd", EPS)(x, w)
    assert y.dtype == torch.bfloat16
    assert ulp_error(y.cpu(), _f64_rmsnorm(x, w).cpu(), torch.bfloat16).max() <= 1.0
    x, r, w = impls.torch_inputs("fused", shape, "bf16", "cuda", seed=7)
    y, h = impl.build("fused", EPS)(x, r, w)
    assert h.dtype == y.dtype == torch.bfloat16
    assert torch.equal(h, (x.float() + r.float()).to(torch.bfloat16))  # one rounding of x + r
    unrounded = _f64_rmsnorm(x.double() + r.double(), w).cpu()
    assert ulp_error(y.cpu(), unrounded, torch.bfloat16).max() <= 1.0
    # Where normalizing the unrounded sum and normalizing h round to different bf16 values,
    # quack's y is the former's (only fp32 error near a rounding midpoint can say otherwise).
    from_sum, from_h = unrounded.to(torch.bfloat16), _f64_rmsnorm(h, w).cpu().to(torch.bfloat16)
    apart = from_sum != from_h
    assert apart.sum() > 1000  # enough elements to tell the two apart
    assert (y.cpu()[apart] == from_sum[apart]).float().mean() >= 0.99


@pytest.mark.parametrize("impl", _gpu_impls("jax"), ids=lambda i: i.name)
def test_jax_peers_on_gpu(impl):
    check_jax_peer(impl, SHAPE, seed=5)


def test_bench_quick_run_on_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--shapes", SHAPE.name, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    assert proc.returncode == 0
    data = json.loads((tmp_path / "rmsnorm_bf16.json").read_text())
    assert report.validate(data) == []
    assert data["device"]["kind"] == "cuda" and data["copy_bandwidth"]["gbps"] > 0
    for floor in data["floors"]:
        assert floor["cold_us"] > 0 and floor["warm_us"] > 0, floor
    available = {d["name"] for d in data["impls"] if d["available"]}
    assert {"torch_eager", "torch_rms_norm", "jax_xla"} <= available
    for rec in data["records"]:
        if rec["impl"] not in available or rec["status"] == "missing":
            continue
        where = f"{rec['impl']} {rec['op']}: {rec['reason']} {rec['notes']}"
        assert rec["status"] == "ok", where
        assert rec["cold_us"] > 0 and rec["warm_us"] > 0, where
        assert rec["cold_copy_share"] is not None and rec["cold_vs_torch_eager"] is not None
        if rec["framework"] == "jax":
            assert rec["kernels"], where  # CUPTI saw the op's kernels
        if rec["op"] == "fwdbwd":
            assert rec["peak_mem_bytes"] and rec["peak_mem_bytes"] > 0, where
    assert all(h["status"] == "ok" and h["us_per_call"] > 0 for h in data["host_overhead"])


def test_default_output_is_this_cards_own_folder():
    import torch

    from bench.__main__ import GPU_OUT, card_slug

    name = torch.cuda.get_device_name(0)
    slug = card_slug(name)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug), (name, slug)
    assert (GPU_OUT / slug).parent == GPU_OUT
    if name == "NVIDIA H200":
        assert slug == "h200"  # a rerun here refreshes the committed H200 results
