"""Backward kernels (interpreted on CPU) against float64 autograd of the reference:
dx, dweight, dresidual; deterministic dweight; opcheck of the registered ops."""

import pytest
import torch

import accel_torch
from accel_torch.kernels import BWD_MAX_BLOCK_N, MAX_BLOCK_N
from accel_torch.ops import rmsnorm_bwd, rmsnorm_fwd, rmsnorm_residual_fwd

from .conftest import needs_interpreter
from .helpers import assert_grad_close, dx_scale, leaf64, rmsnorm64

# rel: fp32 arithmetic error relative to the gradient tensor's scale (see assert_grad_close).
# dx sums N products per row and dweight M products per column, in fp32.
REL = 1e-5

# The backward's layouts: one block, two blocks (BWD_MAX_BLOCK_N < N <= 2x), looped. With
# more rows than programs (4 per SM on the CPU), programs prefetch their next row.
SHAPES = [(1, 1), (3, 7), (2, 3, 129), (37, 200), (9, BWD_MAX_BLOCK_N + 77), (3, MAX_BLOCK_N + 77)]


def _make(shape, dtype, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).mul(2).to(dtype)
    w = None if wdtype is None else (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(wdtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [None, "same", torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_grads_match_float64(shape, dtype, wdtype, offset):
    if wdtype is None and offset:
        pytest.skip("no weight, no offset")
    wdtype = dtype if wdtype == "same" else wdtype
    x, w, dy = _make(shape, dtype, wdtype, seed=len(shape) + shape[-1])
    xg = x.clone().requires_grad_(True)
    wg = None if w is None else w.clone().requires_grad_(True)
    y = accel_torch.rmsnorm(xg, wg, weight_offset=offset)
    grads = torch.autograd.grad(y, [xg] if wg is None else [xg, wg], dy)

    x64 = leaf64(x)
    w64 = None if w is None else leaf64(w)
    y64 = rmsnorm64(x64, w64, weight_offset=offset)
    ref = torch.autograd.grad(y64, [x64] if w is None else [x64, w64], dy.double())

    assert grads[0].dtype == dtype
    assert_grad_close(grads[0], ref[0], REL, dx_scale(x, w, dy, weight_offset=offset))
    if w is not None:
        assert grads[1].dtype == wdtype
        assert_grad_close(grads[1], ref[1], REL)


@pytest.mark.parametrize(
    "shape",
    [
        (3, 7),
        (2, 5, 96),
        (2, BWD_MAX_BLOCK_N + 3),
        (6, 2 * BWD_MAX_BLOCK_N - 5),
        (2, MAX_BLOCK_N + 3),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
@pytest.mark.parametrize("use_h", [False, True])
def test_fused_grads_match_float64(shape, dtype, residual_dtype, use_h):
    x, w, dy = _make(shape, dtype, torch.float32, seed=11)
    h_dtype = residual_dtype or dtype
    r = torch.randn(shape, generator=torch.Generator().manual_seed(12)).to(h_dtype)
    dh = torch.randn(shape, generator=torch.Generator().manual_seed(13)).to(h_dtype)
    xg, rg, wg = (t.clone().requires_grad_(True) for t in (x, r, w))
    y, h = accel_torch.rmsnorm_residual_fused(
        xg, rg, wg, return_residual=True, residual_dtype=residual_dtype
    )
    outs, gouts = ([y, h], [dy, dh]) if use_h else ([y], [dy])
    dx, dr, dw = torch.autograd.grad(outs, [xg, rg, wg], gouts)

    x64, r64, w64 = leaf64(x), leaf64(r), leaf64(w)
    h64 = x64 + r64
    # The reference normalizes the rounded h the kernel normalizes; rounding is identity
    # for gradients, as in the contract (d residual = d x).
    h64 = h64 + ((x.double() + r.double()).to(h_dtype).double() - h64).detach()
    y64 = rmsnorm64(h64, w64)
    outs64 = [y64, h64] if use_h else [y64]
    ref = torch.autograd.grad(outs64, [x64, r64, w64], [g.double() for g in gouts])

    assert dx.dtype == dtype and dr.dtype == h_dtype and dw.dtype == torch.float32
    h = (x.double() + r.double()).to(h_dtype)
    scale = dx_scale(h, w, dy) + (dh.double().abs().max().item() if use_h else 0.0)
    assert_grad_close(dx, ref[0], REL, scale)
    assert_grad_close(dr, ref[1], REL, scale)
    assert_grad_close(dw, ref[2], REL)


def test_dweight_is_bitwise_deterministic():
    x, w, dy = _make((97, 300), torch.bfloat16, torch.bfloat16, seed=3)
    runs = []
    for _ in range(3):
        wg = w.clone().requires_grad_(True)
        (dw,) = torch.autograd.grad(accel_torch.rmsnorm(x, wg), [wg], dy)
        runs.append(dw)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("shape", [(70, 200), (5, BWD_MAX_BLOCK_N + 77), (3, MAX_BLOCK_N + 77)])
@pytest.mark.parametrize("fused", [False, True])
def test_dweight_by_partials_and_by_columns(shape, fused, monkeypatch):
    """Both ways of summing dweight (per-program partials and a second kernel; column
    programs of the same launch, used for few rows) on each row layout: dweight within fp32
    error of float64, dx (and d residual) the same bits either way."""
    from accel_torch import kernels

    x, w, dy = _make(shape, torch.bfloat16, torch.float32, seed=shape[-1])
    r = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.float32)
    x64, w64, r64 = leaf64(x), leaf64(w), leaf64(r)
    h64 = x64 + r64 if fused else x64
    leaves = [x64, w64, r64] if fused else [x64, w64]
    ref = torch.autograd.grad(rmsnorm64(h64, w64), leaves, dy.double())
    grads = {}
    for column_rows in (0, shape[0]):  # partials; columns (tiles of 32 rows: 70 is ragged)
        monkeypatch.setattr(kernels, "BWD_COLUMN_ROWS", column_rows)
        xg, wg, rg = (t.clone().requires_grad_(True) for t in (x, w, r))
        if fused:
            y = accel_torch.rmsnorm_residual_fused(xg, rg, wg, residual_dtype=torch.float32)
            grads[column_rows] = torch.autograd.grad(y, [xg, wg, rg], dy)
        else:
            grads[column_rows] = torch.autograd.grad(accel_torch.rmsnorm(xg, wg), [xg, wg], dy)
    for g in grads.values():
        assert_grad_close(g[1], ref[1], REL)
    partial, column = grads[0], grads[shape[0]]
    assert torch.equal(partial[0], column[0])
    if fused:
        assert torch.equal(partial[2], column[2])


def test_zero_rows_backward():
    x = torch.randn(0, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    y = accel_torch.rmsnorm(x, w)
    assert y.shape == (0, 64)
    dx, dw = torch.autograd.grad(y, [x, w], torch.randn(0, 64))
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros(64))


def test_backward_saves_only_input_and_rstd():
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        accel_torch.rmsnorm(x, w)
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
    # x, weight and one fp32 value per row; nothing of activation size in fp32.
    assert shapes == sorted(
        [((8, 64), torch.bfloat16), ((64,), torch.bfloat16), ((8,), torch.float32)]
    )


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(4, 40, dtype=dtype, requires_grad=True)
    r = torch.randn(4, 40, dtype=torch.float32, requires_grad=True)
    w = torch.randn(40, dtype=dtype, requires_grad=True)
    torch.library.opcheck(rmsnorm_fwd, (x, w, 1e-6, 0.0, False))
    torch.library.opcheck(rmsnorm_fwd, (x, None, 1e-6, 0.0, True))
    torch.library.opcheck(rmsnorm_residual_fwd, (x, r, w, 1e-6, 1.0, False, torch.float32))
    y, rstd = rmsnorm_fwd(x.detach(), w.detach(), 1e-6, 0.0, False)
    dy = torch.randn_like(y)
    torch.library.opcheck(rmsnorm_bwd, (dy, x.detach(), w.detach(), rstd, None, 0.0, None))
    torch.library.opcheck(
        rmsnorm_bwd, (dy, x.detach(), w.detach(), rstd, dy.clone(), 0.0, torch.float32)
    )
