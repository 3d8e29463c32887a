"""Inputs at the edges, on the interpreted kernels and on the fallback: weights and gradients
of any strides (also under torch.compile and as a module's Parameter), float64 computed in
float64, the fused op's d residual in a wider residual dtype, NumPy scalars and bool flags."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import accel_torch

from .helpers import assert_grad_close, assert_within_ulp, dx_scale, leaf64, rmsnorm64

REL = 1e-5  # as in test_backward
N = 64


def _strided_weights():
    g = torch.Generator().manual_seed(0)
    stacked = 1 + 0.3 * torch.randn(N, 5, generator=g)  # (N, L): one column per layer
    return {
        "every-other": (2 + torch.randn(2 * N, generator=g))[::2],
        "expanded": torch.tensor([1.5]).expand(N),
        "column": stacked[:, 3],
    }


@pytest.mark.parametrize("kind", ["every-other", "expanded", "column"])
def test_any_weight_strides(path, kind):
    w = _strided_weights()[kind]
    assert not w.is_contiguous()
    x = torch.randn(4, N).requires_grad_(True)
    wg = w.detach().requires_grad_(True)  # same strides
    assert wg.stride() == w.stride()
    y = accel_torch.rmsnorm(x, wg)
    dy = torch.randn(4, N)
    dx, dw = torch.autograd.grad(y, (x, wg), dy)
    x64, w64 = leaf64(x), leaf64(w)
    y64 = rmsnorm64(x64, w64)
    ref = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert_within_ulp(y, y64)
    assert_within_ulp(accel_torch.rmsnorm(x.detach(), w), y64)  # the no-grad route
    assert_grad_close(dx, ref[0], REL, dx_scale(x, w, dy))
    assert dw.shape == (N,)
    assert_grad_close(dw, ref[1], REL)


def test_module_with_a_view_as_its_weight(path):
    w = _strided_weights()["column"]
    norm = accel_torch.TritonRMSNorm(N, eps=1e-6)
    norm.weight = torch.nn.Parameter(w)
    assert not norm.weight.is_contiguous()
    x = torch.randn(3, N)
    assert_within_ulp(norm(x), rmsnorm64(x, w))
    y, h = norm(x, torch.randn(3, 2 * N)[:, ::2])  # a strided residual too
    assert_within_ulp(y, rmsnorm64(h, w))


def test_strided_weight_under_torch_compile(path):
    w = _strided_weights()["every-other"]
    x = torch.randn(3, N)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: accel_torch.rmsnorm(a, b), backend="aot_eager", fullgraph=True)
    assert_within_ulp(fn(x, w), rmsnorm64(x, w))


def test_expanded_and_strided_gradients(path):
    """dy from sum() is an expanded scalar (stride 0 everywhere); dh a strided view."""
    x = torch.randn(3, N, requires_grad=True)
    r = torch.randn(3, N, requires_grad=True)
    w = torch.rand(N) + 0.5
    y, h = accel_torch.rmsnorm_residual_fused(x, r, w, return_residual=True)
    dh = torch.randn(3, 2 * N)[:, ::2]
    dx, dr = torch.autograd.grad((y.sum(), h), (x, r), (None, dh))
    h64 = leaf64(x + r)
    y64 = rmsnorm64(h64, w)
    (ref,) = torch.autograd.grad((y64.sum(), h64), h64, (None, dh.double()))
    assert_grad_close(dx, ref, REL, dx_scale(x + r, w, torch.ones(3, N)) + dh.abs().max())
    assert torch.equal(dx, dr)


@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_float64_is_computed_in_float64(path, casting):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, N, dtype=torch.float64, generator=g)
    w = 1 + 0.3 * torch.randn(N, dtype=torch.float64, generator=g)
    y = accel_torch.rmsnorm(x, w, casting=casting)
    assert y.dtype == torch.float64
    want = F.rms_norm(x, (N,), w, 1e-6)
    torch.testing.assert_close(y, want, rtol=1e-14, atol=0)  # fp32 arithmetic errs ~1e-8
    r = torch.randn(5, N, dtype=torch.float64, generator=g)
    y, h = accel_torch.rmsnorm_residual_fused(x, r, w, casting=casting, return_residual=True)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (N,), w, 1e-6), rtol=1e-14, atol=0)
    # a float64 residual stream over fp32 activations: h and its norm in float64
    xf = x.float()
    y, h = accel_torch.rmsnorm_residual_fused(
        xf, r, w, residual_dtype=torch.float64, return_residual=True
    )
    assert h.dtype == torch.float64 and torch.equal(h, xf.double() + r)
    assert_within_ulp(y, rmsnorm64(h, w))


def test_wider_residual_gets_its_gradient_in_its_own_dtype(path):
    """x bf16, residual fp32: d residual = d x rounded once from fp32 to fp32 (not through
    bf16), on every path."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, N, generator=g).to(torch.bfloat16).requires_grad_(True)
    r = torch.randn(6, N, generator=g).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(N, generator=g)).to(torch.bfloat16)
    dy = torch.randn(6, N, generator=g).to(torch.bfloat16)
    y = accel_torch.rmsnorm_residual_fused(x, r, w)
    dx, dr = torch.autograd.grad(y, (x, r), dy)
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32
    h64 = leaf64((x.float() + r).to(torch.bfloat16))
    (ref,) = torch.autograd.grad(rmsnorm64(h64, w), h64, dy.double())
    scale = dx_scale(h64, w, dy)
    assert_grad_close(dr, ref, REL, scale)
    assert_grad_close(dx, ref, REL, scale)


@pytest.mark.parametrize("eps", [np.float32(1e-5), np.float64(1e-5), 1e-5])
def test_numpy_scalars_are_accepted(path, eps):
    x = torch.randn(3, N)
    w = torch.rand(N) + 0.5
    want = rmsnorm64(x, w, eps=float(eps), weight_offset=0.5)
    got = accel_torch.rmsnorm(x, w, eps, weight_offset=np.float32(0.5))
    assert_within_ulp(got, want)
    fused = accel_torch.rmsnorm_residual_fused(x, torch.zeros_like(x), w, eps)
    assert_within_ulp(fused, rmsnorm64(x, w, eps=float(eps)))
