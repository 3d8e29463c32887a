"""Forward of rmsnorm / rmsnorm_residual_fused against the float64 reference.

On CPU these run the Pallas kernels in interpret mode (ACCEL_INTERPRET=1 from
tests/conftest.py); on a GPU, compiled. The plain-jnp path is checked the same way.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from tests.jax.helpers import (
    DTYPES,
    assert_llama_close,
    assert_output_close,
    dtype_name,
    f64,
    fwd64,
    is_16bit,
    rand,
)

# Single block, ragged N, N=1, several rows per program (also two rows of 4096-column
# blocks with a ragged row count), looped path.
SHAPES = [(4, 1), (3, 7, 33), (5, 1000), (64, 1024), (5, 3000), (2, 20000)]


def check_forward(
    y, x, r, w, eps=1e-6, *, weight_offset=0.0, casting="fp32", round_dtype=None, h=None
):
    """The contract's forward bounds: "fp32" casting (and fp32 outputs) within 1 ulp / 1e-5 of
    the float64 reference; "llama" 16-bit outputs within one representable step of Hugging
    Face's LlamaRMSNorm steps (fp32 statistics, x*rstd rounded to the normalized dtype)."""
    if casting == "llama" and is_16bit(y.dtype):
        assert_llama_close(y, x if h is None else h, w, eps, weight_offset=weight_offset)
    else:
        ref, _, _ = fwd64(
            x, r, w, eps, weight_offset=weight_offset, casting=casting, round_dtype=round_dtype
        )
        assert_output_close(y, ref)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_rmsnorm_matches_float64(shape, dtype, casting):
    n = shape[-1]
    x = rand(0, shape, dtype)
    w = rand(1, (n,), dtype, scale=0.2, shift=1.0)
    y = accel_jax.rmsnorm(x, w, 1e-6, casting=casting)
    assert y.dtype == x.dtype and y.shape == x.shape
    check_forward(y, x, None, w, 1e-6, casting=casting)


@pytest.mark.parametrize("wdtype", [None, jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_weight_dtype_offset_and_no_weight(wdtype, offset, casting):
    if wdtype is None and offset:
        pytest.skip("weight_offset needs a weight (an error, tested in test_errors)")
    x = rand(2, (6, 96), jnp.bfloat16, scale=3.0)
    w = None if wdtype is None else rand(3, (96,), wdtype, scale=0.3)
    y = accel_jax.rmsnorm(x, w, 1e-5, weight_offset=offset, casting=casting)
    assert y.dtype == jnp.bfloat16
    check_forward(y, x, None, w, 1e-5, weight_offset=offset, casting=casting)


@pytest.mark.parametrize("shape", [(4, 1), (3, 5, 33), (16, 1024), (3, 4096), (2, 20000)], ids=str)
@pytest.mark.parametrize(
    "xdtype,rdtype,residual_dtype",
    [
        (jnp.float32, jnp.float32, None),
        (jnp.bfloat16, jnp.bfloat16, None),
        (jnp.float16, jnp.float16, None),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float32, None),
    ],
    ids=["f32", "bf16", "f16", "bf16+f32res", "bf16->f32h", "f16+f32res->f16h"],
)
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_fused_matches_float64(shape, xdtype, rdtype, residual_dtype, casting):
    n = shape[-1]
    x = rand(4, shape, xdtype)
    r = rand(5, shape, rdtype, scale=2.0)
    w = rand(6, (n,), jnp.float32, scale=0.2, shift=1.0)
    y, h = accel_jax.rmsnorm_residual_fused(
        x, r, w, casting=casting, return_residual=True, residual_dtype=residual_dtype
    )
    h_dtype = jnp.dtype(residual_dtype or xdtype)
    assert y.dtype == x.dtype and h.dtype == h_dtype and h.shape == x.shape
    _, h64, _ = fwd64(x, r, w, casting=casting, round_dtype=h_dtype)
    # h = round(h_dtype, fp32 sum): bit-identical to the reference.
    np.testing.assert_array_equal(f64(h), h64)
    check_forward(y, x, r, w, casting=casting, round_dtype=h_dtype, h=h)
    y_only = accel_jax.rmsnorm_residual_fused(
        x, r, w, casting=casting, residual_dtype=residual_dtype
    )
    np.testing.assert_array_equal(np.asarray(y_only), np.asarray(y))
    # exactly the unfused composition
    y_comp = accel_jax.rmsnorm(h, w, casting=casting)
    if h_dtype == x.dtype:
        np.testing.assert_array_equal(np.asarray(y_comp), np.asarray(y))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_kernels_agree_with_reference_path(dtype):
    """Pallas kernels and the plain-jnp path: within 1 ulp of each other."""
    x = rand(7, (8, 300), dtype)
    r = rand(8, (8, 300), dtype)
    w = rand(9, (300,), dtype, scale=0.2, shift=1.0)
    for casting in ("fp32", "llama"):
        y_k = accel_jax.rmsnorm_residual_fused(x, r, w, casting=casting)
        y_r = accel_jax.rmsnorm_residual_reference(x, r, w, casting=casting)
        assert_output_close(y_k, f64(y_r), what=f"kernel vs reference ({casting})")
        y_k = accel_jax.rmsnorm(x, w, casting=casting, weight_offset=0.5)
        y_r = accel_jax.rmsnorm_reference(x, w, casting=casting, weight_offset=0.5)
        assert_output_close(y_k, f64(y_r), what=f"kernel vs reference ({casting})")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_reference_path_matches_float64(dtype):
    """interpret=False on CPU: the jnp fallback, same numerics."""
    x = rand(10, (4, 3, 100), dtype)
    r = rand(11, (4, 3, 100), dtype)
    w = rand(12, (100,), jnp.float32, scale=0.2, shift=1.0)
    y = accel_jax.rmsnorm(x, w, interpret=False)
    assert_output_close(y, fwd64(x, None, w)[0])
    y, h = accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True, interpret=False)
    ref, h64, _ = fwd64(x, r, w)
    np.testing.assert_array_equal(f64(h), h64)
    assert_output_close(y, ref)


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 20000)], ids=str)
def test_zero_rows(shape):
    x = jnp.zeros(shape, jnp.bfloat16)
    w = jnp.ones(shape[-1], jnp.float32)
    y = accel_jax.rmsnorm(x, w)
    assert y.shape == shape and y.dtype == x.dtype
    y, h = accel_jax.rmsnorm_residual_fused(x, x, w, return_residual=True)
    assert y.shape == shape and h.shape == shape


@pytest.mark.parametrize("n", [64, 1000, 20000])
def test_zero_row_gives_zeros_and_nan_stays_in_its_row(n):
    x = rand(13, (8, n), jnp.float32)
    x = x.at[2].set(0.0).at[5, n // 2].set(jnp.nan).at[6, 0].set(jnp.inf)
    w = rand(14, (n,), jnp.float32, scale=0.2, shift=1.0)
    with np.errstate(invalid="ignore"):
        ref, _, _ = fwd64(x, None, w)  # row 6: inf * rstd 0 is NaN at the inf only
    for y in (accel_jax.rmsnorm(x, w), accel_jax.rmsnorm_residual_fused(x, jnp.zeros_like(x), w)):
        assert_output_close(y, ref)
        y = np.asarray(y)
        assert np.all(y[2] == 0.0)
        assert np.all(np.isnan(y[5]))
        assert np.isnan(y[6, 0]) and np.all(y[6, 1:] == 0.0)
        assert np.all(np.isfinite(y[[0, 1, 3, 4, 7]]))


def test_large_values_do_not_overflow():
    """Squares are accumulated in fp32: fp16 inputs near the top of the range are fine."""
    x = rand(15, (4, 512), jnp.float16, scale=8.0e3)
    y = accel_jax.rmsnorm(x)
    assert np.all(np.isfinite(np.asarray(y)))
    assert_output_close(y, fwd64(x)[0])


def test_leading_shape_and_eps():
    x = rand(16, (2, 3, 4, 48), jnp.float32, scale=1e-3)
    for eps in (0.0, 1e-6, 1e-2):
        y = accel_jax.rmsnorm(x, eps=eps)
        assert_output_close(y, fwd64(x, eps=eps)[0])
