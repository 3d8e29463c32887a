"""The input and autodiff edges on the compiled CUDA kernels (marked gpu: skipped without
CUDA): strided weights (eager and compiled), double backward, float64, torch.func and
forward mode, each against float64 autograd of the reference formula."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf

import accel_torch

from .helpers import assert_grad_close, assert_within_ulp, leaf64, rmsnorm64

pytestmark = pytest.mark.gpu

N = 1024
REL = 1e-5  # fp32 arithmetic relative to the terms' size, as in test_backward


def _inputs(rows=64, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, N, generator=g, device="cuda").mul(2).to(dtype)
    w = (1 + 0.3 * torch.randn(N, generator=g, device="cuda")).to(dtype)
    v = torch.randn(rows, N, generator=g, device="cuda").to(dtype)
    return x, w, v


def _strided_weights(w):
    stacked = torch.stack([w * 0.5, w, w * 2], dim=1)  # (N, 3): a column has stride 3
    return {
        "step2": torch.stack([w, w * 3], dim=1).flatten()[::2],
        "expanded": w[:1].expand(N),
        "column": stacked[:, 1],
    }


@pytest.mark.parametrize("kind", ["step2", "expanded", "column"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_strided_weight_on_cuda(kind, compiled):
    x, w, _v = _inputs(dtype=torch.bfloat16)
    ws = _strided_weights(w)[kind]
    assert not ws.is_contiguous()
    f = accel_torch.rmsnorm
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(accel_torch.rmsnorm, fullgraph=True)
    y = f(x, ws)
    assert_within_ulp(y, rmsnorm64(x.double(), ws.double()))
    # the same weight as a Parameter view of a module
    norm = accel_torch.TritonRMSNorm(N, eps=1e-6).cuda()
    norm.weight = torch.nn.Parameter(ws)
    assert_within_ulp(norm(x), rmsnorm64(x.double(), ws.double()))


def test_double_backward_on_cuda_kernels():
    x, w, v = _inputs()

    def second(f, x, w):
        x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(f(x, w).sin().sum(), x, create_graph=True)
        return torch.autograd.grad((gx * v.to(x.dtype)).sum(), (x, w))

    got = second(accel_torch.rmsnorm, x, w)
    ref = second(lambda a, b: rmsnorm64(a, b), leaf64(x), leaf64(w))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        assert_grad_close(g, r, REL)


def test_float64_on_cuda_is_float64_and_gradchecks():
    x, w, _v = _inputs(rows=4, dtype=torch.float64)
    y = accel_torch.rmsnorm(x, w)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, rmsnorm64(x, w), rtol=1e-12, atol=1e-12)
    xs, ws = x[:, :16].clone().requires_grad_(), w[:16].clone().requires_grad_()
    assert torch.autograd.gradcheck(accel_torch.rmsnorm, (xs, ws))
    assert torch.autograd.gradgradcheck(accel_torch.rmsnorm, (xs, ws))


def test_torch_func_and_forward_mode_on_cuda():
    x, w, v = _inputs(rows=8)
    x64, w64 = x.double(), w.double()
    gx = tf.grad(lambda a: (accel_torch.rmsnorm(a, w) * v).sum())(x)
    gx64 = tf.grad(lambda a: (rmsnorm64(a, w64) * v.double()).sum())(x64)
    assert_grad_close(gx, gx64, REL)

    ys = tf.vmap(lambda a: accel_torch.rmsnorm(a, w))(x.view(2, 4, N))
    assert_within_ulp(ys.view(8, N), rmsnorm64(x64, w64))

    _y, t = tf.jvp(lambda a: accel_torch.rmsnorm(a, w), (x,), (v,))
    _y64, t64 = tf.jvp(lambda a: rmsnorm64(a, w64), (x64,), (v.double(),))
    assert_grad_close(t, t64, REL)

    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        tangent = fwAD.unpack_dual(accel_torch.rmsnorm(dual, w)).tangent
    assert tangent is not None
    assert_grad_close(tangent, t64, REL)
