"""Forward kernels (interpreted on CPU) against the float64 reference: every dtype, both
castings, weight dtypes, offset, fused residual, strided input, 0 rows, odd and looped N."""

import pytest
import torch

import accel_torch
from accel_torch import kernels
from accel_torch.kernels import MAX_BLOCK_N
from accel_torch.launch import rows_view as _rows

from .conftest import needs_interpreter
from .helpers import assert_llama_matches_hf, assert_within_ulp, rmsnorm64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0, 8), (1, 1), (3, 7), (2, 3, 33), (4, 1000), (2, MAX_BLOCK_N + 123)]


def _inputs(shape, dtype, wdtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).mul(3).to(dtype)
    w = None if wdtype is None else (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(wdtype)
    return x, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_rmsnorm_matches_float64(shape, dtype, casting):
    x, w = _inputs(shape, dtype, dtype)
    y = accel_torch.rmsnorm(x, w, 1e-5, casting=casting)
    assert y.dtype == dtype and y.shape == x.shape
    if casting == "llama":
        assert_llama_matches_hf(y, x, w, 1e-5)
    else:
        assert_within_ulp(y, rmsnorm64(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_weight_dtype_and_offset(dtype, wdtype, offset):
    if wdtype is None and offset:
        pytest.skip("no weight: offset is rejected (tested in test_errors)")
    x, w = _inputs((5, 96), dtype, wdtype, seed=1)
    y = accel_torch.rmsnorm(x, w, weight_offset=offset)
    assert y.dtype == dtype
    assert_within_ulp(y, rmsnorm64(x, w, 1e-6, weight_offset=offset))


@pytest.mark.parametrize("shape", [(0, 16), (3, 7), (2, 2, 257), (2, MAX_BLOCK_N + 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_fused_residual(shape, dtype, residual_dtype, casting):
    x, w = _inputs(shape, dtype, torch.float32, seed=2)
    r = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(residual_dtype or dtype)
    y, h = accel_torch.rmsnorm_residual_fused(
        x, r, w, casting=casting, return_residual=True, residual_dtype=residual_dtype
    )
    h_dtype = residual_dtype or dtype
    h_expected = (x.double() + r.double()).to(h_dtype)
    assert h.dtype == h_dtype and y.dtype == dtype
    # h is x + r rounded once from the exact sum (fp32 addition of two inputs of <= 24 bits
    # is exact for bf16/fp16, and correctly rounded for fp32).
    assert torch.equal(h, h_expected)
    if casting == "llama":  # LlamaRMSNorm applied to the residual stream h, y in x's dtype
        assert_llama_matches_hf(y, h, w, out_dtype=dtype)
    else:
        assert_within_ulp(y, rmsnorm64(h, w))
    y_only = accel_torch.rmsnorm_residual_fused(
        x, r, w, casting=casting, residual_dtype=residual_dtype
    )
    assert torch.equal(y_only, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_strided_input_is_read_in_place(dtype):
    big, w = _inputs((6, 200), dtype, dtype, seed=4)
    x = big[:, 10:138]  # rows 200 apart, last dim contiguous
    assert _rows(x).data_ptr() == x.data_ptr()  # no copy on the way to the kernel
    y = accel_torch.rmsnorm(x, w[:128])
    assert_within_ulp(y, rmsnorm64(x, w[:128]))
    x3 = big.view(2, 3, 200)[:, :, :64]
    assert_within_ulp(accel_torch.rmsnorm(x3, w[:64]), rmsnorm64(x3, w[:64]))


def test_transposed_input_still_correct():
    x = torch.randn(64, 5).t()  # last dim not contiguous: copied, still right
    assert_within_ulp(accel_torch.rmsnorm(x), rmsnorm64(x))


def test_zero_rows_give_zero_and_nan_stays_in_its_row():
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    x[1] = 0
    x[2, 17] = float("nan")
    x[3, 5] = float("inf")
    w = torch.randn(300, dtype=torch.bfloat16)
    y = accel_torch.rmsnorm(x, w)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert y[2].isnan().all() and y[3].isnan().any()
    assert_within_ulp(y[0:1], rmsnorm64(x[0:1], w))


def test_fp32_overflowing_sum_of_squares_matches_pytorch():
    x = torch.full((2, 64), 1e20)
    x[1] = torch.randn(64)
    y = accel_torch.rmsnorm(x)
    expected = torch.nn.functional.rms_norm(x, (64,), eps=1e-6)
    assert torch.equal(y[0], expected[0])  # x*x overflows: rstd = 0, y = 0, as PyTorch
    assert_within_ulp(y[1:], rmsnorm64(x[1:]))


@needs_interpreter
def test_fallback_path_matches_kernels():
    x, w = _inputs((3, 100), torch.bfloat16, torch.bfloat16, seed=5)
    y_kernel = accel_torch.rmsnorm(x, w)
    accel_torch.set_interpret(False)
    try:
        y_torch = accel_torch.rmsnorm(x, w)
    finally:
        accel_torch.set_interpret(True)
    assert_within_ulp(y_torch, rmsnorm64(x, w))
    assert (
        (y_kernel.double() - y_torch.double()).abs()
        <= 2 * torch.finfo(torch.bfloat16).eps * y_torch.double().abs()
    ).all()


@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_several_rows_per_program(rows, casting, monkeypatch):
    """Programs of several rows, the last one ragged, on strided rows; plain and fused
    (with the weight loaded at the other time than the default launch's)."""
    from accel_torch import launch

    def several_rows(m, n, fused=False):
        parts, _, looped, num_warps, early_weight = kernels.fwd_launch(m, n, fused)
        return parts, rows, looped, num_warps, not early_weight

    monkeypatch.setattr(launch, "fwd_launch", several_rows)
    big, w = _inputs((7, 160), torch.bfloat16, torch.float32, seed=6)
    x = big[:, 20:120]
    r = torch.randn(7, 100, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    y = accel_torch.rmsnorm(x, w[:100], casting=casting)
    y_fused, h = accel_torch.rmsnorm_residual_fused(
        x, r, w[:100], casting=casting, return_residual=True
    )
    assert torch.equal(h, (x.double() + r.double()).to(torch.bfloat16))
    if casting == "llama":
        assert_llama_matches_hf(y, x, w[:100])
        assert_llama_matches_hf(y_fused, h, w[:100])
    else:
        assert_within_ulp(y, rmsnorm64(x, w[:100]))
        assert_within_ulp(y_fused, rmsnorm64(h, w[:100]))
