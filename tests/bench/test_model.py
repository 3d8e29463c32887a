"""``python -m bench.model``: the variants compute the same step, the norm attribution
counts exactly the norm's work, and the command writes its report (tiny shapes).

Numbers are checked against a float64 run of the same weights (the model cast to float64
after it was built, so both see the same rounded parameters). No timing is asserted.
"""

import copy
import json

import pytest
import torch

import accel_torch  # noqa: F401  (before transformers, which may import Triton)
from bench.model import decode_torch, llama_torch, profile_torch, train_torch
from bench.model.__main__ import main
from bench.model.configs import TINY

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances against float64 (relative): fp32 steps agree to ~2e-7, bf16 to ~5e-3 (grads)
# and ~2e-5 (loss) on this tiny model; both variants alike.
TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.bfloat16: dict(loss=1e-3, grad=2e-2)}


def _ids(shape, seed=1):
    return torch.randint(0, TINY.vocab, shape, generator=torch.Generator().manual_seed(seed))


def _loss_grads(model, variant, ids):
    switch = llama_torch.NormSwitch(model)
    switch.use(variant)
    loss = train_torch.train_step(model, ids.to(next(model.parameters()).device))()
    grads = torch.cat([p.grad.double().flatten().cpu() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    switch.use("hf")
    return loss.detach().double().cpu(), grads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_step_variants_match_float64(dtype):
    model = llama_torch.build_llama(TINY, 1, DEVICE, dtype)
    ids = _ids((1, 8))
    ref_loss, ref_grads = _loss_grads(copy.deepcopy(model).double(), "hf", ids)
    variants = ["hf", "accel"] + (
        ["liger"] if DEVICE == "cuda" and not llama_torch.liger_missing() else []
    )
    errors = {}
    for variant in variants:
        loss, grads = _loss_grads(model, variant, ids)
        errors[variant] = _rel(grads, ref_grads)
        assert abs(float(loss - ref_loss)) <= TOL[dtype]["loss"] * abs(float(ref_loss)), variant
        assert errors[variant] <= TOL[dtype]["grad"], (variant, errors)
    # The drop-ins reproduce HF's formula: no further from float64 than HF's own norm.
    for variant in variants[1:]:
        assert errors[variant] <= 1.25 * errors["hf"] + 1e-7, errors


def test_norm_switch_keeps_the_weights_and_rejects_unknown_variants():
    model = llama_torch.build_llama(TINY, 1, "cpu", torch.float32)
    switch = llama_torch.NormSwitch(model)
    weights = [m.weight for m in switch.norms()]
    assert len(weights) == 3  # input and post-attention norms of one layer, final norm
    norms = switch.use("accel")
    assert all(type(m).__name__ == "PromotingRMSNorm" for m in norms)  # Llama's formula
    assert [m.weight for m in norms] == weights  # the same Parameters
    assert all(type(m).__name__ == "LlamaRMSNorm" for m in switch.use("hf"))
    with pytest.raises(ValueError, match="variant"):
        switch.use("apex")


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_decode_step_variants_match_float64_and_the_cache(kind):
    """The first decode step's logits against float64; a static cache takes one token per
    step up to its room, then raises; a dynamic one is rewound after each step."""
    past, batch = 6, 2
    model = llama_torch.build_llama(TINY, 1, DEVICE, torch.float32).eval()
    prompt, token = _ids((batch, past)).to(DEVICE), _ids((batch, 1), seed=2).to(DEVICE)

    def logits(m, variant):
        switch = llama_torch.NormSwitch(m)
        cache = decode_torch.make_cache(m, kind, batch, past + 2)
        decode_torch.prefill(m, cache, prompt)
        switch.use(variant)
        step = decode_torch.decode_step(m, cache, token, room=2)
        first, second = step(), step()
        if kind == "static":
            assert int(cache.get_seq_length()) == past + 2
            with pytest.raises(RuntimeError, match="room for 2"):
                step()
        else:
            assert int(cache.get_seq_length()) == past
        switch.use("hf")
        return first.double().cpu(), second.double().cpu()

    ref, ref_second = logits(copy.deepcopy(model).double(), "hf")
    for variant in ["hf", "accel"]:
        first, second = logits(model, variant)
        assert _rel(first, ref) <= 1e-5, variant
        assert _rel(second, ref_second) <= 1e-5, variant
        if kind == "dynamic":  # rewound: the same cache, the same step
            torch.testing.assert_close(second, first, rtol=0, atol=0)
        else:  # one more cached token
            assert _rel(second, first) > 1e-3


def test_norm_ranges_cover_exactly_the_norms_ops():
    """On a CPU profile of a training step, the norm ranges hold the norms' forward ops and
    the backward nodes of those ops, and nothing of the layers around them."""
    from torch.profiler import ProfilerActivity, profile

    model = llama_torch.build_llama(TINY, 1, "cpu", torch.float32)
    switch = llama_torch.NormSwitch(model)
    step = train_torch.train_step(model, _ids((1, 8)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with profile_torch.norm_ranges(switch.norms()):
            step()
    events = [
        {
            "ph": "X",
            "cat": "user_annotation" if e.name in profile_torch.NORM_RANGES else "cpu_op",
            "name": e.name,
            "pid": 0,
            "tid": e.thread,
            "ts": e.time_range.start,
            "dur": e.time_range.elapsed_us(),
        }
        for e in prof.events()
    ]
    ranges = [e for e in events if e["cat"] == "user_annotation"]
    # 3 norms: each forward, and each of the 6 autograd nodes HF's eager norm creates in
    # fp32 (pow, mean, add, rsqrt, two muls; its .to(float32) casts are no-ops here).
    assert sum(e["name"] == profile_torch.NORM_FWD for e in ranges) == 3
    assert sum(e["name"] == profile_torch.NORM_BWD for e in ranges) == 3 * 6
    ops = set(profile_torch.ops_in_norm(events))
    assert {"aten::pow", "aten::mean", "aten::rsqrt", "PowBackward0", "RsqrtBackward0"} <= ops
    outside = {
        "aten::mm",
        "aten::addmm",
        "aten::linear",
        "aten::embedding",
        "aten::silu",
        "MmBackward0",
        "SiluBackward0",
        "EmbeddingBackward0",
        "NllLossBackward0",
    }
    assert not ops & outside, ops & outside


def test_attribute_counts_kernels_launched_inside_norm_ranges_on_their_thread():
    def x(cat, name, ts, dur, tid=1, corr=None):
        e = {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur}
        if corr is not None:
            e["args"] = {"correlation": corr}
        return e

    fwd, bwd = profile_torch.NORM_FWD, profile_torch.NORM_BWD
    events = [
        x("user_annotation", fwd, 100, 10),
        x("user_annotation", bwd, 200, 10, tid=2),
        x("cuda_runtime", "cudaLaunchKernel", 105, 1, corr=1),  # in the forward range
        x("cuda_driver", "cuLaunchKernel", 205, 1, tid=2, corr=2),  # backward thread's range
        x("cuda_runtime", "cudaLaunchKernel", 205, 1, tid=1, corr=3),  # same time, other thread
        x("cuda_runtime", "cudaMemcpyAsync", 150, 1, corr=4),  # between ranges
        x("kernel", "norm_fwd", 1000, 3.0, tid=9, corr=1),
        x("kernel", "norm_bwd", 1010, 5.0, tid=9, corr=2),
        x("kernel", "gemm", 1020, 40.0, tid=9, corr=3),
        x("gpu_memcpy", "Memcpy DtoD", 1070, 2.0, tid=9, corr=4),
        x("kernel", "orphan", 1080, 10.0, tid=9, corr=99),  # its launch is not in the trace
    ]
    out = profile_torch.attribute(events)
    assert out["total_us"] == 60.0
    assert out["norm_us"] == 8.0
    assert out["share"] == pytest.approx(8.0 / 60.0)
    assert out["kernels"] == {"norm_bwd": [1, 5.0], "norm_fwd": [1, 3.0]}
    assert (out["ranges"], out["unmatched"]) == (2, 1)
    assert profile_torch.attribute([x("user_annotation", fwd, 0, 1)])["total_us"] is None
    # By kernel name, wherever launched (the orphan too); by the forward ranges only.
    named = profile_torch.attribute(events, ("norm_", "orphan"))
    assert named["norm_us"] == 18.0 and "gemm" not in named["kernels"]
    forward_only = profile_torch.attribute(events, None, (fwd,))
    assert forward_only["kernels"] == {"norm_fwd": [1, 3.0]}


def test_nnx_step_variants_match():
    import jax
    import jax.numpy as jnp

    from bench.model import transformer_nnx
    from bench.model.configs import default_config

    cfg = default_config(on_gpu=False)
    cfg.nnx_layers, cfg.seq, cfg.steps, cfg.dtype = 1, 8, 1, "fp32"
    outputs = {}
    records = transformer_nnx.run(cfg, lambda msg: None, outputs)
    assert [(r["variant"], r["status"]) for r in records] == [("flax", "ok"), ("accel", "ok")]
    (flax_loss, flax_grads), (loss, grads) = outputs["flax"], outputs["accel"]
    assert abs(float(loss - flax_loss)) <= 1e-5 * abs(float(flax_loss))
    assert jax.tree.structure(grads) == jax.tree.structure(flax_grads)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads), strict=True):
        assert float(jnp.linalg.norm(g - ref)) <= 1e-5 * float(jnp.linalg.norm(ref)) + 1e-9


def _tiny_args(out, parts="train,decode,nnx"):
    return [
        "--tiny",
        "--layers",
        "1",
        "--seq",
        "8",
        "--batches",
        "1",
        "--past",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--nnx-layers",
        "1",
        "--out",
        str(out),
        "--parts",
        parts,
    ]


def _check_written(out, parts=("train", "decode", "nnx")):
    results = json.loads((out / "model.json").read_text())
    assert results["schema"] == "bench.model"
    assert {"torch", "transformers", "jax", "flax", "python"} <= set(results["versions"])
    assert results["config"]["layers"] == [1] and results["config"]["shape"]["hidden"] == 64
    by = {(r["part"], r["variant"]): r for r in results["records"]}
    expected = {(p, v) for p in ("train", "decode") if p in parts for v in llama_torch.VARIANTS}
    assert set(by) == expected | ({("nnx", "flax"), ("nnx", "accel")} if "nnx" in parts else set())
    for key, rec in by.items():
        expected = (
            "ok"
            if key[1] != "liger" or (DEVICE == "cuda" and not llama_torch.liger_missing())
            else "missing"
        )
        assert rec["status"] == expected, (key, rec.get("reason"))
    losses = [by["train", v]["loss"] for v in ("hf", "accel")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert "Training step" in (out / "model.md").read_text()
    return by


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU run is tested here")
def test_cli_cpu_run_writes_its_report(tmp_path, capsys):
    # The nnx part's run is tested above (test_nnx_step_variants_match); its compiles are slow.
    assert main(_tiny_args(tmp_path, "train,decode")) == 0
    by = _check_written(tmp_path, ("train", "decode"))
    assert by["train", "hf"]["profile"]["total_us"] is None  # no device events on a CPU
    assert "Decode step" in capsys.readouterr().out


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU run is tested here")
def test_cli_cpu_run_refuses_the_gpu_results_folder(capsys):
    from bench.__main__ import GPU_OUT

    assert main(["--parts", "train", "--out", str(GPU_OUT / "x" / "model")]) == 2
    assert "committed GPU results" in capsys.readouterr().err


@pytest.mark.gpu
def test_cli_gpu_tiny_run(tmp_path):
    """The tiny configs on CUDA: every available variant runs, the profiler finds device
    time, and the norm's kernels are a share of it for each torch variant and accel_jax."""
    assert main(_tiny_args(tmp_path)) == 0
    by = _check_written(tmp_path)
    for (part, variant), rec in by.items():
        if rec["status"] != "ok":
            continue
        assert rec["step_ms"] > 0, (part, variant)
        prof = rec.get("profile") or {}
        if part in ("train", "decode") or variant == "accel":
            assert prof["total_us"] > 0 and 0 < prof["share"] < 1, (part, variant, prof)
    assert by["train", "hf"]["peak_bytes"] > 0
    assert any("rmsnorm" in name for name in by["nnx", "accel"]["profile"]["kernels"])
