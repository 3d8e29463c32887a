"""``python -m bench`` end to end on this (CPU-only) machine, in a subprocess.

A subprocess keeps the bench's process-wide settings (accel packages switched to their
CPU paths, JAX allocator flags) out of the test session. No timing is asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import impls, report
from bench.__main__ import build_parser, card_slug, main, run_shapes
from bench.shapes import CPU_SHAPES, GPU_SHAPES, WIDTH_SHAPES, Shape, parse_shapes

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU-only behaviour is tested here"
)


def run_bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_cpu_run_says_so_writes_results_and_exits_0(tmp_path):
    out = tmp_path / "res"
    proc = run_bench("--quick", "--shapes", "4x64,2x128", "--dtype", "fp32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels need CUDA" in proc.stdout
    assert "[1/2] 4x64" in proc.stderr and "[2/2] 2x128" in proc.stderr  # progress lines
    assert "CPU wall-clock" in proc.stdout and "missing: liger" in proc.stdout
    assert "missing: quack: quack-kernels " in proc.stdout  # not installed, or needs CUDA
    assert (proc.stdout + proc.stderr).count("No CUDA GPU") == 1  # said once, at the start
    assert "a CPU has no such counter" in proc.stdout  # why torch's peak memory is n/a

    data = json.loads((out / "rmsnorm_fp32.json").read_text())
    assert report.validate(data) == []
    assert data["device"]["kind"] == "cpu" and data["dtype"] == "fp32"
    assert data["shapes"] == ["4x64", "2x128"] and data["ops"] == ["fwd", "fused", "fwdbwd"]
    by = {(r["impl"], r["shape"], r["op"]): r for r in data["records"]}
    assert len(by) == len(impls.REGISTRY) * 2 * 3  # every implementation, shape and op
    assert by[("liger", "4x64", "fwd")]["status"] == "missing"
    quack = by[("quack", "2x128", "fused")]
    assert quack["status"] == "missing" and quack["reason"].startswith("quack-kernels ")
    assert quack["reason"].endswith(("(CUDA, Hopper or newer)", "CUDA-only)")), quack
    assert by[("torch_compile", "4x64", "fwd")]["status"] == "missing"
    for name in ("torch_eager", "torch_rms_norm", "jax_xla", "flax_linen"):
        for op in ("fwd", "fused", "fwdbwd"):
            rec = by[(name, "2x128", op)]
            assert rec["status"] == "ok", rec
            assert rec["cold_us"] is None and rec["warm_us"] > 0  # CPU: one wall-clock time
            assert rec["bytes"] == {"fwd": 2, "fused": 4, "fwdbwd": 5}[op] * 256 * 4
    assert {f["framework"] for f in data["floors"]} == {"torch", "jax"}
    assert len(data["host_overhead"]) > 0
    assert (out / "rmsnorm_fp32.md").read_text().startswith("# RMSNorm benchmark results")
    assert (out / "rmsnorm_fp32.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_run_never_writes_the_committed_gpu_results():
    results = ROOT / "bench" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.exists() else None
    proc = run_bench("--quick", "--shapes", "2x8", "--out", str(results))
    assert proc.returncode == 2 and "committed GPU results" in proc.stderr
    after = sorted(p.name for p in results.iterdir()) if results.exists() else None
    assert before == after


def test_cpu_run_never_writes_into_a_card_folder():
    card = ROOT / "bench" / "results" / "h200"
    before = sorted(p.name for p in card.iterdir())
    proc = run_bench("--quick", "--shapes", "2x8", "--out", str(card))
    assert proc.returncode == 2 and "committed GPU results" in proc.stderr
    assert sorted(p.name for p in card.iterdir()) == before


def test_card_slug():
    assert card_slug("NVIDIA H200") == "h200"
    assert card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert card_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"


def test_committed_results_sit_in_their_cards_folders():
    found = sorted((ROOT / "bench" / "results").glob("*/rmsnorm_*.json"))
    assert found
    for path in found:
        device = json.loads(path.read_text())["device"]
        assert device["kind"] == "cuda"
        assert path.parent.name == card_slug(device["name"]), path


def test_help_states_the_defaults_that_apply():
    text = " ".join(build_parser().format_help().split())
    skipped = [i.name for i in impls.REGISTRY if not i.cpu_default]
    cuda_only = [i.name for i in impls.REGISTRY if i.needs_cuda]
    assert skipped and cuda_only
    needs_cuda = text.split("compile) and ")[1].split(" need")[0].split(", ")
    assert needs_cuda == cuda_only and f"{skipped[0]} runs only when named" in text
    assert "liger, quack, accel_jax_triton, accel_jax_mgpu need CUDA" in text
    assert "default: all)" not in text
    assert "bench/results/<card>/ on a GPU" in text and "bench/results-cpu on a CPU" in text
    assert "--widths also run the hidden widths real models use: " + ", ".join(WIDTH_SHAPES) in text


@pytest.mark.parametrize("on_gpu", [True, False])
def test_widths_follow_the_run_shapes_once_each(on_gpu):
    widths = parse_shapes(WIDTH_SHAPES)
    default = parse_shapes(GPU_SHAPES if on_gpu else CPU_SHAPES)
    assert run_shapes(None, False, on_gpu) == default
    with_widths = run_shapes(None, True, on_gpu)
    assert with_widths[: len(default)] == default
    assert with_widths[len(default) :] == [w for w in widths if w not in default]
    assert len(set(with_widths)) == len(with_widths)
    given = [Shape(2, 8), Shape(4096, 7168)]  # a width given first keeps its place
    assert run_shapes("2x8,4096x7168,2x8", True, on_gpu) == given + [
        w for w in widths if w != Shape(4096, 7168)
    ]
    with pytest.raises(ValueError, match="shape"):
        run_shapes("4096", True, on_gpu)


def test_main_runs_the_widths(monkeypatch, tmp_path):
    from bench import runner

    seen = {}

    def fake_run(cfg):
        seen["shapes"] = [s.name for s in cfg.shapes]
        raise SystemExit(0)  # stop before timing anything

    monkeypatch.setattr(runner, "run", fake_run)
    with pytest.raises(SystemExit):
        main(["--quick", "--shapes", "4x64,4096x5120", "--widths", "--out", str(tmp_path)])
    assert seen["shapes"] == ["4x64", "4096x5120"] + [s for s in WIDTH_SHAPES if s != "4096x5120"]


def test_bad_arguments_exit_2():
    for args in (["--shapes", "4096"], ["--ops", "fwd,bwd"], ["--impls", "cudnn"]):
        proc = run_bench(*args)
        assert proc.returncode == 2, args
        assert "error:" in proc.stderr
