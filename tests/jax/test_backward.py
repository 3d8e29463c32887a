"""Gradients (custom_vjp backward kernels) against float64, check_grads, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import accel_jax
from accel_jax import kernels
from tests.jax.helpers import DTYPES, assert_grad_close, bwd64, f64, fwd64, rand

# single block, ragged N, N = 1, several rows per block, two chunks per row
# (BWD_MAX_CHUNK < N <= 2 * BWD_MAX_CHUNK), looped path
SHAPES = [(3, 1), (2, 5, 33), (9, 1000), (600, 64), (3, 12000), (3, 20000)]


def _loss_weights(key, shape, dtype):
    """A fixed cotangent: grads of sum(y * c) are vjp(c)."""
    return rand(key, shape, dtype)


CASES = [(d, "fp32") for d in DTYPES] + [(jnp.bfloat16, "llama")]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,casting", CASES, ids=lambda v: str(getattr(v, "__name__", v)))
def test_rmsnorm_grads_match_float64(shape, dtype, casting):
    """Straight through the llama rounding: its gradient is the fp32 casting's formula."""
    n = shape[-1]
    x = rand(0, shape, dtype)
    w = rand(1, (n,), dtype, scale=0.2, shift=1.0)
    dy = _loss_weights(2, shape, dtype)
    y, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, casting=casting), x, w)
    dx, dw = vjp(dy)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w)
    assert_grad_close(dx, ref_dx, cx, what="dx")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("wdtype", [None, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_grads_weight_dtype_and_offset(wdtype, offset):
    if wdtype is None and offset:
        pytest.skip("weight_offset needs a weight")
    x = rand(3, (7, 160), jnp.bfloat16)
    w = None if wdtype is None else rand(4, (160,), wdtype, scale=0.3)
    dy = _loss_weights(5, x.shape, jnp.bfloat16)
    if w is None:
        _, vjp = jax.vjp(lambda x: accel_jax.rmsnorm(x), x)
        (dx,) = vjp(dy)
    else:
        _, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, weight_offset=offset), x, w)
        dx, dw = vjp(dy)
        assert dw.dtype == w.dtype
    ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w, weight_offset=offset)
    if w is not None:
        assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")
    assert_grad_close(dx, ref_dx, cx, what="dx")


@pytest.mark.parametrize("shape", [(3, 1), (4, 3, 100), (70, 64), (2, 12000), (2, 20000)], ids=str)
@pytest.mark.parametrize(
    "xdtype,rdtype,residual_dtype",
    [
        (jnp.float32, jnp.float32, None),
        (jnp.bfloat16, jnp.bfloat16, None),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.float16, jnp.float32, None),
    ],
    ids=["f32", "bf16", "bf16+f32res", "f16+f32res->f16h"],
)
@pytest.mark.parametrize("use_h", [False, True])
def test_fused_grads_match_float64(shape, xdtype, rdtype, residual_dtype, use_h):
    """d residual = d x = dx_norm(h) + dh, each rounded once to its input's dtype."""
    n = shape[-1]
    x = rand(6, shape, xdtype)
    r = rand(7, shape, rdtype, scale=2.0)
    w = rand(8, (n,), jnp.float32, scale=0.2, shift=1.0)
    h_dtype = jnp.dtype(residual_dtype or xdtype)
    dy = _loss_weights(9, shape, xdtype)
    dh = _loss_weights(10, shape, h_dtype) if use_h else None

    def f(x, r, w):
        return accel_jax.rmsnorm_residual_fused(
            x, r, w, return_residual=use_h, residual_dtype=residual_dtype
        )

    _, vjp = jax.vjp(f, x, r, w)
    dx, dr, dw = vjp((dy, dh) if use_h else dy)
    assert dx.dtype == x.dtype and dr.dtype == r.dtype and dw.dtype == w.dtype
    _, h64, _ = fwd64(x, r, w, round_dtype=h_dtype)
    ref_dh, ref_dw, cx, cw = bwd64(dy, h64, w, dh=dh)
    assert_grad_close(dx, ref_dh, cx, what="dx")
    assert_grad_close(dr, ref_dh, cx, what="dresidual")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("shape", [(4, 7), (3, 20000)], ids=str)
def test_check_grads(shape):
    """Numerical (finite-difference) check of the custom_vjp, fp32, reverse mode."""
    n = shape[-1]
    x = rand(11, shape, jnp.float32)
    r = rand(12, shape, jnp.float32)
    w = rand(13, (n,), jnp.float32, scale=0.2, shift=1.0)

    def fused(x, r, w):
        y, h = accel_jax.rmsnorm_residual_fused(x, r, w, weight_offset=0.5, return_residual=True)
        return y * 2.0 + jnp.sin(h)

    # fp32 rounding of y over 2*eps is the finite-difference noise, summed over all outputs:
    # at 60000 outputs the default eps=1e-4 gives ~0.1 of noise, so wide rows use 1e-2
    # (truncation error, O(eps**2), stays far below that).
    eps = 1e-2 if n > 1024 else None
    check_grads(lambda x, w: accel_jax.rmsnorm(x, w), (x, w), order=1, modes=["rev"], eps=eps)
    check_grads(fused, (x, r, w), order=1, modes=["rev"], eps=eps)


def test_grads_of_reference_path_match_float64():
    """interpret=False on CPU: the jnp twin of the backward, same formula."""
    x = rand(14, (5, 3, 100), jnp.bfloat16)
    w = rand(15, (100,), jnp.float32, scale=0.2, shift=1.0)
    dy = _loss_weights(16, x.shape, jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, interpret=False), x, w)
    dx, dw = vjp(dy)
    ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w)
    assert_grad_close(dx, ref_dx, cx, what="dx")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("shape", [(600, 64), (9, 20000)], ids=str)
def test_dweight_is_deterministic(shape):
    """Fixed programs, fixed reduction order: the same bits on every run."""
    x = rand(17, shape, jnp.float32, scale=3.0)
    w = rand(18, (shape[-1],), jnp.float32)
    dy = _loss_weights(19, shape, jnp.float32)
    grad = jax.jit(jax.vjp(lambda w: accel_jax.rmsnorm(x, w), w)[1])
    first = np.asarray(grad(dy)[0])
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(grad(dy)[0]), first)


@pytest.mark.parametrize(
    "shape", [(9, 1001), (10, 1001), (41, 2, 72), (4, 9000), (5, 9000)], ids=str
)
def test_grads_when_programs_loop(shape, monkeypatch):
    """Fewer programs than row blocks: each program walks several blocks (the one-chunk
    layout prefetches the next), with every program full or the last steps ragged."""
    monkeypatch.setattr(kernels, "BWD_MAX_PROGRAMS", 3)
    monkeypatch.setattr(kernels, "BWD_MAX_PROGRAMS_WIDE", 2)
    n = shape[-1]
    x = rand(22, shape, jnp.bfloat16)
    w = rand(23, (n,), jnp.float32, scale=0.2, shift=1.0)
    dy = _loss_weights(24, shape, jnp.bfloat16)
    dx, dw = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, weight_offset=0.5), x, w)[1](dy)
    ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w, weight_offset=0.5)
    assert_grad_close(dx, ref_dx, cx, what="dx")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


def test_backward_program_count_depends_on_shape_only():
    assert kernels.bwd_programs(8192, 1) == kernels.BWD_MAX_PROGRAMS
    assert kernels.bwd_programs(5, 1) == 5
    assert kernels.bwd_programs(600, 64) == 10


def test_zero_rows_grads():
    x = jnp.zeros((0, 64), jnp.bfloat16)
    w = jnp.ones((64,), jnp.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(accel_jax.rmsnorm(x, w)), argnums=(0, 1))(x, w)
    assert dx.shape == (0, 64) and dx.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(dw), np.zeros(64, np.float32))


def test_nan_row_gradient_stays_in_its_row():
    x = rand(20, (6, 96), jnp.float32).at[2, 5].set(jnp.nan)
    w = rand(21, (96,), jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(accel_jax.rmsnorm(x, w)))(x)
    dx = np.asarray(dx)
    assert np.all(np.isnan(dx[2]))
    assert np.all(np.isfinite(dx[[0, 1, 3, 4, 5]]))
