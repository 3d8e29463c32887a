"""Compiled Pallas Triton kernels at real sizes on a GPU (marked gpu; skipped elsewhere).

Run: python -m pytest -q -m gpu tests/jax
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from tests.jax.helpers import (
    assert_grad_close,
    assert_llama_close,
    assert_output_close,
    bwd64,
    f64,
    fwd64,
    rand,
)

pytestmark = pytest.mark.gpu

SHAPES = [(2048, 4096), (8192, 4096), (4096, 16384), (64, 65536), (32, 131072)]
# The backward's single launch (dweight by column programs): at most BWD_COLUMN_ROWS rows,
# ragged against its tiles, 32 and 64 columns per program, two chunks per row.
FEW_ROWS = [(1, 4096), (256, 4096), (257, 3584), (600, 6144), (1024, 4096), (5, 16384)]
DTYPES = [jnp.bfloat16, jnp.float32, jnp.float16]


@pytest.fixture(autouse=True)
def _compiled_kernels():
    if jax.default_backend() != "gpu":
        pytest.skip("needs JAX with a CUDA GPU")
    previous = accel_jax.get_interpret()
    accel_jax.set_interpret(False)
    yield
    accel_jax.set_interpret(previous)


def test_gpu_dispatch_uses_compiled_pallas_kernels():
    x = rand(0, (8, 4096), jnp.bfloat16)
    text = str(jax.make_jaxpr(lambda x: accel_jax.rmsnorm(x))(x))
    assert "pallas_call" in text
    hlo = jax.jit(lambda x: accel_jax.rmsnorm(x)).lower(x).as_text()
    assert "triton" in hlo.lower()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_forward_real_sizes(shape, dtype):
    n = shape[-1]
    x = rand(1, shape, dtype)
    w = rand(2, (n,), dtype, scale=0.2, shift=1.0)
    y = jax.jit(lambda x, w: accel_jax.rmsnorm(x, w))(x, w)
    assert_output_close(y, fwd64(x, None, w)[0])
    y = accel_jax.rmsnorm(x, w, casting="llama")
    if dtype == jnp.float32:
        assert_output_close(y, fwd64(x, None, w, casting="llama")[0])
    else:
        assert_llama_close(y, x, w)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_real_sizes(shape):
    n = shape[-1]
    x = rand(3, shape, jnp.bfloat16)
    r = rand(4, shape, jnp.float32, scale=2.0)
    w = rand(5, (n,), jnp.float32, scale=0.2, shift=1.0)
    for residual_dtype in (None, jnp.float32):
        y, h = accel_jax.rmsnorm_residual_fused(
            x, r, w, weight_offset=0.5, return_residual=True, residual_dtype=residual_dtype
        )
        h_dtype = jnp.dtype(residual_dtype or x.dtype)
        ref, h64, _ = fwd64(x, r, w, weight_offset=0.5, round_dtype=h_dtype)
        np.testing.assert_array_equal(f64(h), h64)
        assert_output_close(y, ref)


@pytest.mark.parametrize("shape", SHAPES + FEW_ROWS, ids=str)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_backward_real_sizes(shape, dtype):
    n = shape[-1]
    x = rand(6, shape, dtype)
    w = rand(7, (n,), jnp.float32, scale=0.2, shift=1.0)
    dy = rand(8, shape, dtype)
    _, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w), x, w)
    dx, dw = jax.jit(vjp)(dy)
    ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w)
    assert_grad_close(dx, ref_dx, cx, what="dx")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("shape", [(8192, 4096), (64, 65536), (256, 4096), (600, 6144)], ids=str)
def test_fused_backward_real_sizes(shape):
    n = shape[-1]
    x = rand(9, shape, jnp.bfloat16)
    r = rand(10, shape, jnp.float32)
    w = rand(11, (n,), jnp.bfloat16, scale=0.2, shift=1.0)
    dy = rand(12, shape, jnp.bfloat16)
    dh = rand(13, shape, jnp.float32)

    def f(x, r, w):
        return accel_jax.rmsnorm_residual_fused(
            x, r, w, return_residual=True, residual_dtype=jnp.float32
        )

    _, vjp = jax.vjp(f, x, r, w)
    dx, dr, dw = jax.jit(vjp)((dy, dh))
    assert dx.dtype == jnp.bfloat16 and dr.dtype == jnp.float32 and dw.dtype == jnp.bfloat16
    _, h64, _ = fwd64(x, r, w, round_dtype=jnp.float32)
    ref, ref_dw, cx, cw = bwd64(dy, h64, w, dh=dh)
    assert_grad_close(dx, ref, cx, what="dx")
    assert_grad_close(dr, ref, cx, what="dresidual")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("shape", [(8192, 4096), (32, 131072), (256, 4096)], ids=str)
def test_dweight_deterministic_on_gpu(shape):
    x = rand(14, shape, jnp.bfloat16)
    w = rand(15, (shape[-1],), jnp.float32)
    dy = rand(16, shape, jnp.bfloat16)
    grad = jax.jit(jax.vjp(lambda w: accel_jax.rmsnorm(x, w), w)[1])
    first = np.asarray(grad(dy)[0])
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(grad(dy)[0]), first)


def test_leading_shape_zero_rows_and_nan_on_gpu():
    x = rand(17, (2, 3, 1000), jnp.bfloat16).at[1, 2, 7].set(jnp.nan)
    y = np.asarray(accel_jax.rmsnorm(x).astype(jnp.float32))
    assert np.all(np.isnan(y[1, 2])) and np.isfinite(np.delete(y.reshape(6, -1), 5, 0)).all()
    assert accel_jax.rmsnorm(jnp.zeros((0, 4096), jnp.bfloat16)).shape == (0, 4096)


def test_no_triton_deprecation_warning_on_gpu():
    """JAX >= 0.11 warns when a Pallas Triton kernel lowers; users must not see it."""
    x = rand(18, (64, 4096), jnp.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = jax.jit(lambda x: jax.grad(lambda x: jnp.sum(accel_jax.rmsnorm(x)))(x))
        jax.block_until_ready(f(x))
        warnings.warn("still visible", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("Pallas Triton" in m for m in messages), messages
    assert "still visible" in messages


def test_flax_modules_on_gpu():
    import flax.linen as fnn

    x = rand(19, (2048, 4096), jnp.bfloat16)
    mod = accel_jax.linen.RMSNorm(param_dtype=jnp.bfloat16)
    params = mod.init(jax.random.key(0), x)
    y = jax.jit(mod.apply)(params, x)
    y_flax = fnn.RMSNorm(param_dtype=jnp.bfloat16).apply(params, x)
    steps = np.abs(
        np.asarray(y).view(np.int16).astype(np.int64)
        - np.asarray(y_flax).view(np.int16).astype(np.int64)
    )
    assert steps.max() <= 1


@pytest.mark.parametrize(
    "n, elements",
    [(4096, 2**31 - 4096), (32768, 2**31 - 32768), (4096, 2**31 + 32768), (4096, 2**32 + 32768)],
    ids=["single-block-below-limit", "looped-below-limit", "above-limit", "above-2-pow-32"],
)
def test_near_and_past_2_pow_31_elements(n, elements):
    """bf16 arrays just under 2^32 bytes, past it and past 2^32 elements (one kernel call
    each, offsets past 32 bits), forward and backward: the first, middle and last rows
    against float64. x and dy repeat a few random rows (period K), so dweight's float64
    reference is K rows weighted by their counts."""
    m = elements // n
    k = 7
    base_x = rand(20, (k, n), jnp.bfloat16)
    base_dy = rand(21, (k, n), jnp.bfloat16)
    w = rand(22, (n,), jnp.float32, scale=0.2, shift=1.0)

    def tile(base):
        return jnp.tile(base, (_cdiv(m, k), 1))[:m]

    x, dy = jax.jit(tile)(base_x), jax.jit(tile)(base_dy)
    assert x.size == elements

    # forward and backward in one jit, as a training step runs: jit(vjp) would capture the
    # saved x as a constant of the program, and XLA crashed compiling one of 2^32 bytes
    def fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w), x, w)
        return (y, *vjp(dy))

    y, dx, dw = jax.jit(fwd_bwd)(x, w, dy)
    rows = np.array([0, 1, m // 2, m - 2, m - 1])
    ref_y = fwd64(base_x[rows % k], None, w)[0]
    assert_output_close(y[rows], ref_y)
    ref_dx, _, cx, _ = bwd64(base_dy[rows % k], f64(base_x[rows % k]), w)
    assert_grad_close(dx[rows], ref_dx, cx, what="dx")
    counts = np.bincount(np.arange(m) % k, minlength=k).astype(np.float64)
    xs, dys = f64(base_x), f64(base_dy)
    xhat = xs / np.sqrt(np.mean(xs * xs, axis=-1, keepdims=True) + 1e-6)
    ref_dw = np.sum(counts[:, None] * dys * xhat, axis=0)
    dw_cond = np.max(np.sum(counts[:, None] * np.abs(dys * xhat), axis=0))
    assert_grad_close(dw, ref_dw, dw_cond, per_row=False, what="dweight")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
