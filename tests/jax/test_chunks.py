"""Blocks of 2^32 bytes or more run the kernels on row chunks (accel_jax.sharding.row_chunks).

On the CPU, with the chunk limit lowered to a few rows: one kernel call per chunk, the
outputs and gradients within the contract's bounds of the float64 reference (h bit-exact),
dweight's chunk partials summed the same way every run, and the lowered CUDA program has
one kernel per chunk. The real sizes (2^31 elements and past) run on the GPU
(tests/jax/test_gpu.py::test_near_and_past_2_pow_31_elements).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from accel_jax import kernels, ops, sharding
from tests.jax.helpers import assert_grad_close, assert_output_close, bwd64, f64, fwd64, rand
from tests.jax.test_transforms import _jaxlib_lowers_without_compiling

BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize(
    "m, n, itemsize",
    [
        (1, 1, 4),
        (2**20 - 1, 2048, 2),  # just below CHUNK_BYTES: one chunk
        (2**20, 2048, 2),  # CHUNK_BYTES: two
        (2**31 // 4096 + 8, 4096, 2),  # the GPU test's above-limit case
        (3, 2**30, 4),  # a row wider than a chunk: one row each
        (1000, 3, 4),
    ],
)
def test_row_chunks_cover_the_rows_within_the_limit(m, n, itemsize):
    chunks = sharding.row_chunks(m, n, itemsize)
    per = max(1, (sharding.CHUNK_BYTES - 1) // (n * itemsize))
    assert len(chunks) == -(-m // per)  # as few as the limit allows
    assert chunks[0][0] == 0 and chunks[-1][1] == m
    assert all(a[1] == b[0] for a, b in zip(chunks[:-1], chunks[1:], strict=True))
    assert all(0 < (stop - start) <= per for start, stop in chunks)
    assert all(
        (stop - start) * n * itemsize < sharding.CHUNK_BYTES or stop - start == 1
        for start, stop in chunks
    )


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 10 rows of 256 fp32 elements; jit caches cleared around it (the limit is
    read when a call is traced)."""
    jax.clear_caches()
    monkeypatch.setattr(sharding, "CHUNK_BYTES", 10 * 256 * 4 + 1)
    yield
    jax.clear_caches()


def _run(fused, x, r, w, dy, dh):
    """(y, h, dx, dres, dweight) of one interpret-mode forward + backward."""
    if fused:

        def f(x, r, w):
            return accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True, interpret=True)

        (y, h), vjp = jax.vjp(f, x, r, w)
        dx, dres, dw = vjp((dy, dh))
        return y, h, dx, dres, dw
    y, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, interpret=True), x, w)
    dx, dw = vjp(dy)
    return y, None, dx, None, dw


def _inputs(m, n, dtype):
    x = rand(1, (m, n), dtype)
    r = rand(2, (m, n), dtype)
    w = rand(3, (n,), F32, scale=0.2, shift=1.0)
    dy = rand(4, (m, n), dtype)
    dh = rand(5, (m, n), dtype)
    return x, r, w, dy, dh


def _count_calls(monkeypatch, name):
    """A list that grows by one each time kernels.<name> is traced."""
    calls, real = [], getattr(kernels, name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)
    return calls


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_chunked_calls_against_float64(small_chunks, monkeypatch, fused, dtype):
    m, n = 37, 256  # bf16: 20 rows a chunk (2 chunks); fp32: 10 (4 chunks of 10, 9, 9, 9)
    fwd_calls = _count_calls(monkeypatch, "rmsnorm_fwd")
    bwd_calls = _count_calls(monkeypatch, "rmsnorm_bwd")
    x, r, w, dy, dh = _inputs(m, n, dtype)
    y, h, dx, dres, dw = _run(fused, x, r, w, dy, dh)
    chunks = sharding.row_chunks(m, n, jnp.dtype(dtype).itemsize)
    assert len(chunks) > 1
    shapes = [(b - a, n) for a, b in chunks]
    # one kernel call per chunk each time the op is traced (the forward may be traced twice)
    for calls in (fwd_calls, bwd_calls):
        assert calls and calls == shapes * (len(calls) // len(shapes)), calls

    y64, h64, _ = fwd64(x, r if fused else None, w)
    assert_output_close(y, y64)
    if fused:
        np.testing.assert_array_equal(f64(h), h64)
    ref_dx, ref_dw, dx_cond, dw_cond = bwd64(dy, h64, w, dh=dh if fused else None)
    assert_grad_close(dx, ref_dx, dx_cond, what="dx")
    if fused:
        np.testing.assert_array_equal(np.asarray(dres), np.asarray(dx))
    assert_grad_close(dw, ref_dw, dw_cond, per_row=False, what="dweight")
    # deterministic: the same bits from a second chunked run
    jax.clear_caches()
    np.testing.assert_array_equal(np.asarray(_run(fused, x, r, w, dy, dh)[4]), np.asarray(dw))


def test_chunked_bf16_weight_dweight_rounded_once(small_chunks):
    """A bf16 weight: dweight's chunk partials are summed in fp32 and rounded once."""
    m, n = 64, 256
    x, _, _, dy, _ = _inputs(m, n, BF16)
    w = rand(3, (n,), BF16, scale=0.2, shift=1.0)
    _, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, interpret=True), x, w)
    _, dw = vjp(dy)
    assert dw.dtype == BF16
    _, ref_dw, _, dw_cond = bwd64(dy, f64(x), w)
    assert_grad_close(dw, ref_dw, dw_cond, per_row=False, what="dweight")


@pytest.mark.skipif(
    jax.default_backend() == "gpu" or not _jaxlib_lowers_without_compiling(),
    reason="CPU-only check of the Triton lowering (GPU runs compile for real)",
)
def test_lowered_program_has_one_kernel_per_chunk(small_chunks, monkeypatch):
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False})
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "triton")
    m, n = 45, 256  # fp32: 10 rows a chunk, 5 chunks
    x = jnp.ones((m, n), F32)
    w = jnp.ones((n,), F32)

    def fwd(x, w):
        return accel_jax.rmsnorm(x, w)

    def fwd_bwd(x, w):
        return jax.grad(lambda x, w: jnp.sum(accel_jax.rmsnorm(x, w)), argnums=(0, 1))(x, w)

    chunks = len(sharding.row_chunks(m, n, 4))
    assert chunks == 5
    # the backward of so few rows: one launch (dx with column programs for dweight)
    for f, per_chunk in ((fwd, 1), (fwd_bwd, 2)):
        text = jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == chunks * per_chunk, f.__name__
