"""The peer registry: each peer the bench builds computes the benchmarked op.

Outputs are checked against a float64 reference of the contract's math at fp32 (where
every implementation must agree to ~fp32 rounding): y and h within 1e-5 relative, and
dx, dw within 1e-5 relative of their largest entry. Missing peers must say why.
"""

import sys

import numpy as np
import pytest

from bench import impls, runner
from bench.shapes import OPS, Shape

from . import fakes

SHAPE = Shape(8, 64)
EPS = 1e-6
RTOL = 1e-5


def reference(x, w, dy=None, r=None):
    """float64 forward (and backward): h = x + r, y = h * rstd * w, dx, dw."""
    x = np.asarray(x, np.float64)
    h = x if r is None else x + np.asarray(r, np.float64)
    w = np.asarray(w, np.float64)
    rstd = 1.0 / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + EPS)
    xhat = h * rstd
    out = {"y": xhat * w, "h": h}
    if dy is not None:
        dy = np.asarray(dy, np.float64)
        g = dy * w
        out["dx"] = rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
        out["dw"] = np.sum(dy * xhat, axis=0)
    return out


def close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= RTOL, f"{what}: max error {err:.2e} relative to the largest entry"


def runnable(framework):
    out = []
    for impl in impls.REGISTRY:
        if impl.framework != framework:
            continue
        reason = impl.unavailable(on_gpu=False, requested=True)
        out.append(pytest.param(impl, marks=pytest.mark.skip(reason) if reason else ()))
    return out


def _np(t):
    """A float32 numpy copy of a torch tensor (any device) or array."""
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)


def check_torch_peer(impl, shape, device, seed):
    """impl's fwd, fused and fwdbwd at shape (fp32, on device) against float64."""
    for op in ("fwd", "fused", "fwdbwd"):
        if impl.op_unavailable(op):
            continue
        args = impls.torch_inputs(op, shape, "fp32", device, seed=seed)
        out = impl.build(op, EPS)(*args)
        a = [_np(t) for t in args]
        if op == "fwd":
            close(_np(out), reference(a[0], a[1])["y"], f"{impl.name} fwd y")
        elif op == "fused":
            ref = reference(a[0], a[2], r=a[1])
            assert isinstance(out, tuple) and len(out) == 2
            close(_np(out[0]), ref["y"], f"{impl.name} fused y")
            close(_np(out[1]), ref["h"], f"{impl.name} fused h")
        else:
            ref = reference(a[0], a[1], dy=a[2])
            dx, dw = out
            close(_np(dx), ref["dx"], f"{impl.name} dx")
            close(_np(dw), ref["dw"], f"{impl.name} dw")


@pytest.mark.parametrize("impl", runnable("torch"), ids=lambda i: i.name)
def test_torch_peer_numerics(impl):
    check_torch_peer(impl, SHAPE, "cpu", seed=3)


def check_jax_peer(impl, shape, seed):
    """impl's jitted fwd, fused and fwdbwd at shape (fp32) against the float64 reference."""
    import jax

    for op in ("fwd", "fused", "fwdbwd"):
        args = impls.jax_inputs(op, shape, "fp32", seed=seed)
        out = jax.jit(impl.build(op, EPS))(*args)
        a = [np.asarray(t, np.float32) for t in args]
        if op == "fwd":
            close(out, reference(a[0], a[1])["y"], f"{impl.name} fwd y")
        elif op == "fused":
            ref = reference(a[0], a[2], r=a[1])
            close(out[0], ref["y"], f"{impl.name} fused y")
            close(out[1], ref["h"], f"{impl.name} fused h")
        else:
            ref = reference(a[0], a[1], dy=a[2])
            y, dx, dw = out
            close(y, ref["y"], f"{impl.name} fwdbwd y")
            close(dx, ref["dx"], f"{impl.name} dx")
            close(dw, ref["dw"], f"{impl.name} dw")


@pytest.mark.parametrize("impl", runnable("jax"), ids=lambda i: i.name)
def test_jax_peer_numerics(impl):
    check_jax_peer(impl, SHAPE, seed=3)


def test_inputs_dtypes_and_shapes():
    import torch

    x, r, w = impls.torch_inputs("fused", SHAPE, "bf16", "cpu")
    assert x.shape == r.shape == (8, 64) and w.shape == (64,)
    assert x.dtype == r.dtype == w.dtype == torch.bfloat16
    x, w, dy = impls.torch_inputs("fwdbwd", SHAPE, "fp16", "cpu")
    assert x.requires_grad and w.requires_grad and not dy.requires_grad
    jx, jw, jdy = impls.jax_inputs("fwdbwd", SHAPE, "bf16")
    assert str(jx.dtype) == str(jw.dtype) == "bfloat16" and jdy.shape == (8, 64)


def test_missing_peers_say_why():
    liger = impls.BY_NAME["liger"]
    reason = liger.unavailable(on_gpu=False)
    assert reason and ("not installed" in reason or "CUDA" in reason)
    compiled = impls.BY_NAME["torch_compile"]
    assert "CPU" in compiled.unavailable(on_gpu=False)
    assert compiled.unavailable(on_gpu=False, requested=True) is None
    broken = impls.Impl(
        "nope", "nope", "torch", False, "", lambda: "nope not installed", lambda op, eps: None
    )
    assert broken.unavailable(on_gpu=True) == "nope not installed"


def test_select():
    assert [i.name for i in impls.select(None)] == [i.name for i in impls.REGISTRY]
    assert [i.name for i in impls.select("accel_jax,torch_eager")] == ["torch_eager", "accel_jax"]
    with pytest.raises(ValueError, match="unknown implementations"):
        impls.select("torch_eager,cudnn")
    assert {i.framework for i in impls.REGISTRY} == {"torch", "jax"}
    ours = [i.name for i in impls.REGISTRY if i.project]
    assert ours == ["accel_torch", "accel_jax", "accel_jax_triton", "accel_jax_mgpu"]


@pytest.mark.parametrize("name, choice", [("accel_jax", "auto"), ("accel_jax_triton", "triton")])
def test_accel_jax_columns_trace_under_their_backend(monkeypatch, name, choice):
    """Each accel_jax column's op reads its own backend setting when traced, whatever
    ACCEL_JAX_BACKEND says (the variable is the setting of the plain column)."""
    import jax

    from accel_jax import backends

    monkeypatch.setenv("ACCEL_JAX_BACKEND", "auto")
    real, seen = backends.backend, []
    monkeypatch.setattr(backends, "backend", lambda: seen.append(real()) or seen[-1])
    for op in ("fwd", "fused", "fwdbwd"):
        seen.clear()
        jax.make_jaxpr(impls.BY_NAME[name].build(op, EPS))(*impls.jax_inputs(op, SHAPE, "fp32"))
        assert seen and set(seen) == {choice}, (op, seen)


def test_mosaic_gpu_column_needs_hopper(monkeypatch):
    from accel_jax import backends

    mgpu = impls.BY_NAME["accel_jax_mgpu"]
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: False)
    assert "compute capability 9.0" in mgpu.unavailable(on_gpu=True)
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: True)
    assert mgpu.unavailable(on_gpu=True) is None
    for name in ("accel_jax_mgpu", "accel_jax_triton"):  # on a CPU: the accel_jax column's
        assert "CUDA" in impls.BY_NAME[name].unavailable(on_gpu=False, requested=True)


# ------------------------------------------------------------------------------ quack


def test_quack_is_a_cuda_only_torch_peer_reported_missing_when_absent(monkeypatch):
    quack = impls.BY_NAME["quack"]
    assert (quack.label, quack.framework, quack.project, quack.needs_cuda) == (
        "quack",
        "torch",
        False,
        True,
    )
    monkeypatch.setitem(sys.modules, "quack", None)  # absent, even where it is installed
    want = "quack-kernels not installed: pip install quack-kernels (CUDA, Hopper or newer)"
    assert quack.check() == want
    assert quack.unavailable(on_gpu=True) == want
    assert quack.unavailable(on_gpu=False) == want


def test_quack_installed_runs_every_op_through_its_api(monkeypatch):
    calls = fakes.fake_quack(monkeypatch)
    quack = impls.BY_NAME["quack"]
    assert quack.check() is None
    assert quack.unavailable(on_gpu=True) is None
    assert "CUDA GPU" in quack.unavailable(on_gpu=False)
    assert all(quack.op_unavailable(op) is None for op in OPS)
    check_torch_peer(quack, SHAPE, "cpu", seed=4)  # fwd, fused, fwdbwd against float64
    fwd, fused, fwdbwd_fwd = calls
    base = dict(bias=None, out_dtype=None, residual_dtype=None, eps=EPS, weight_offset=0.0)
    assert fwd == {**base, "residual": None, "prenorm": False}
    assert fused["residual"] is not None and fused["prenorm"] is True
    assert {k: fused[k] for k in base} == base
    assert fwdbwd_fwd == fwd


def test_quack_says_how_its_math_differs_from_the_contract():
    quack = impls.BY_NAME["quack"]
    entry = runner.impl_entry(quack, None)
    assert set(entry["op_notes"]) == set(OPS)
    assert "fast-math" in entry["op_notes"]["fwd"]
    assert "not h rounded to x's dtype" in entry["op_notes"]["fused"]
    assert "fast-math" in quack.description and "unrounded fp32 x + r" in quack.description
    for name in ("torch_eager", "torch_rms_norm", "accel_torch", "jax_xla"):
        assert runner.impl_entry(impls.BY_NAME[name], None)["op_notes"] == {}


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (RuntimeError("CUDA DSL: no device"), "RuntimeError: CUDA DSL: no device"),
        # a dependency missing is a broken install, not quack missing
        (ModuleNotFoundError("No module named 'cutlass'", name="cutlass"), "'cutlass'"),
    ],
)
def test_quack_broken_install_reports_its_error(monkeypatch, error, says):
    fakes.broken_package(monkeypatch, "quack", error)
    reason = impls.BY_NAME["quack"].check()
    assert reason.startswith("quack-kernels failed to import: ") and says in reason, reason
    assert "not installed" not in reason
