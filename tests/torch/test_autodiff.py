"""Autodiff beyond one backward, on the interpreted kernels and on the fallback: double
backward (also through the custom ops), gradcheck / gradgradcheck in float64, forward mode,
torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, vmap, functional_call) and
FakeTensorMode. Every result is checked against float64 autograd of the reference formula."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
from torch._subclasses.fake_tensor import FakeTensorMode

import accel_torch
from accel_torch import ops

from .conftest import needs_interpreter
from .helpers import assert_grad_close, leaf64, rmsnorm64

# fp32 arithmetic error relative to the size of the result (as in test_backward): second
# derivatives combine two row reductions of N = 16 terms in fp32.
REL = 1e-5
N = 16


def _inputs(seed=0, rows=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, N, generator=g).mul(2).to(dtype)
    w = (1 + 0.3 * torch.randn(N, generator=g)).to(dtype)
    r = torch.randn(rows, N, generator=g).to(dtype)
    v = torch.randn(rows, N, generator=g).to(dtype)
    return x, w, r, v


def _second_derivatives(f, x, w, v):
    """d/d(x, w) of <v, d/dx sum(sin(f(x, w)))>: a gradient penalty's double backward."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(x, w).sin().sum(), x, create_graph=True)
    return torch.autograd.grad((gx * v).sum(), (x, w))


def _ref64(x, w, v):
    return _second_derivatives(lambda a, b: rmsnorm64(a, b), leaf64(x), leaf64(w), v.double())


def test_double_backward_is_exact(path):
    x, w, _r, v = _inputs()
    got = _second_derivatives(lambda a, b: accel_torch.rmsnorm(a, b), x, w, v)
    for g, ref in zip(got, _ref64(x, w, v), strict=True):
        assert g.dtype == torch.float32
        assert_grad_close(g, ref, REL)


def test_fused_double_backward_is_exact(path):
    x, w, r, v = _inputs(1)

    def fused(a, b):
        y, h = accel_torch.rmsnorm_residual_fused(a, r, b, return_residual=True)
        return y + 0.5 * h

    def fused64(a, b):
        h = a + r.double()
        return rmsnorm64(h, b) + 0.5 * h

    got = _second_derivatives(fused, x, w, v)
    ref = _second_derivatives(fused64, leaf64(x), leaf64(w), v.double())
    for g, want in zip(got, ref, strict=True):
        assert_grad_close(g, want, REL)


def test_double_backward_through_the_custom_ops(path):
    """The torch.compile / DTensor route: the ops' registered backward is differentiable."""
    x, w, r, v = _inputs(2)
    got = _second_derivatives(lambda a, b: ops.rmsnorm_fwd(a, b, 1e-6, 0.0, False)[0], x, w, v)
    for g, ref in zip(got, _ref64(x, w, v), strict=True):
        assert_grad_close(g, ref, REL)
    got = _second_derivatives(
        lambda a, b: ops.rmsnorm_residual_fwd(a, r, b, 1e-6, 0.0, False, a.dtype)[0], x, w, v
    )
    ref = _second_derivatives(
        lambda a, b: rmsnorm64(a + r.double(), b), leaf64(x), leaf64(w), v.double()
    )
    for g, want in zip(got, ref, strict=True):
        assert_grad_close(g, want, REL)


@pytest.mark.parametrize("casting", ["fp32", "llama"])
def test_gradcheck_and_gradgradcheck_in_float64(path, casting):
    x, w, r, _v = (leaf64(t) for t in _inputs(3, rows=2))

    def norm(a, b):
        return accel_torch.rmsnorm(a, b, weight_offset=0.5, casting=casting)

    def fused(a, res, b):
        return accel_torch.rmsnorm_residual_fused(a, res, b, casting=casting, return_residual=True)

    def op(a, b):  # the custom op, as DTensor inputs take it
        return ops.rmsnorm_fwd(a, b, 1e-6, 0.0, casting == "llama")[0]

    for f, args in [(norm, (x, w)), (fused, (x, r, w)), (op, (x, w))]:
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


def _jacobian64(x, w):
    return torch.autograd.functional.jacobian(
        lambda a, b: rmsnorm64(a, b), (x.double(), w.double())
    )


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad(path, requires_grad):
    x, w, _r, v = _inputs(4)
    tw = torch.randn(N)
    jx, jw = _jacobian64(x, w)
    want = torch.einsum("ijkl,kl->ij", jx, v.double()) + torch.einsum("ijk,k->ij", jw, tw.double())
    with fwAD.dual_level():
        xd = fwAD.make_dual(x.clone().requires_grad_(requires_grad), v)
        wd = fwAD.make_dual(w.clone(), tw)
        tangent = fwAD.unpack_dual(accel_torch.rmsnorm(xd, wd)).tangent
    assert tangent is not None
    assert_grad_close(tangent, want, REL)

    _y, tangent = tf.jvp(lambda a, b: accel_torch.rmsnorm(a, b), (x, w), (v, tw))
    assert_grad_close(tangent, want, REL)


def test_fused_forward_mode_ad(path):
    x, w, r, v = _inputs(5)
    tr = torch.randn_like(r)
    (y, h), (ty, th) = tf.jvp(
        lambda a, res: accel_torch.rmsnorm_residual_fused(a, res, w, return_residual=True),
        (x, r),
        (v, tr),
    )
    _, want = tf.jvp(lambda a: rmsnorm64(a, w.double()), (h.double(),), ((v + tr).double(),))
    assert_grad_close(ty, want, REL)
    torch.testing.assert_close(th, v + tr, rtol=0, atol=0)


def test_torch_func_grad_vjp_jacrev_jacfwd_hessian(path):
    x, w, _r, v = _inputs(6, rows=2)
    jx, jw = _jacobian64(x, w)

    def loss(a, b):
        return (accel_torch.rmsnorm(a, b) * v).sum()

    gx, gw = tf.grad(loss, argnums=(0, 1))(x, w)
    assert_grad_close(gx, torch.einsum("ijkl,ij->kl", jx, v.double()), REL)
    assert_grad_close(gw, torch.einsum("ijk,ij->k", jw, v.double()), REL)

    _y, vjp_fn = tf.vjp(lambda a: accel_torch.rmsnorm(a, w), x)
    assert_grad_close(vjp_fn(v)[0], torch.einsum("ijkl,ij->kl", jx, v.double()), REL)

    for jac in (tf.jacrev, tf.jacfwd):
        assert_grad_close(jac(lambda a: accel_torch.rmsnorm(a, w))(x), jx, REL)

    def loss64(a):
        return rmsnorm64(a, w.double()).sin().sum()

    want = torch.autograd.functional.hessian(loss64, x.double())
    got = tf.hessian(lambda a: accel_torch.rmsnorm(a, w).sin().sum())(x)
    assert_grad_close(got, want, REL)


def test_functional_call_grad_of_the_module(path):
    norm = accel_torch.TritonRMSNorm(N, eps=1e-6)
    x, w, _r, v = _inputs(7)
    params = {"weight": w}

    def loss(p, a):
        return (tf.functional_call(norm, p, (a,)) * v).sum()

    grads = tf.grad(loss)(params, x)
    _jx, jw = _jacobian64(x, w)
    assert_grad_close(grads["weight"], torch.einsum("ijk,ij->k", jw, v.double()), REL)


def test_vmap(path):
    g = torch.Generator().manual_seed(8)
    xb = torch.randn(4, 3, N, generator=g)
    wb = 1 + 0.3 * torch.randn(4, N, generator=g)
    rb = torch.randn(4, 3, N, generator=g)
    w = wb[0]
    want = rmsnorm64(xb, w)
    assert_grad_close(tf.vmap(lambda a: accel_torch.rmsnorm(a, w))(xb), want, REL)
    # the batch dimension anywhere, and a weight per sample
    got = tf.vmap(lambda a, b: accel_torch.rmsnorm(a, b), in_dims=(1, 0))(xb.transpose(0, 1), wb)
    assert_grad_close(got, rmsnorm64(xb) * wb[:, None].double(), REL)
    # fused: a batched residual over one x
    y, h = tf.vmap(
        lambda res: accel_torch.rmsnorm_residual_fused(xb[0], res, w, return_residual=True)
    )(rb)
    assert torch.equal(h, xb[0] + rb)
    assert_grad_close(y, rmsnorm64(h, w), REL)
    # vmap of grad: per-sample gradients
    per_sample = tf.vmap(tf.grad(lambda a: accel_torch.rmsnorm(a, w).sin().sum()))(xb)
    x64 = leaf64(xb)
    (want,) = torch.autograd.grad(rmsnorm64(x64, w).sin().sum(), x64)
    assert_grad_close(per_sample, want, REL)


@pytest.mark.parametrize("fused", [False, True])
def test_fake_tensor_mode_forward_and_backward(path, fused):
    with FakeTensorMode():
        x = torch.randn(4, N, requires_grad=True)
        w = torch.ones(N, requires_grad=True)
        if fused:
            r = torch.randn(4, N, requires_grad=True)
            y, h = accel_torch.rmsnorm_residual_fused(x, r, w, return_residual=True)
            (y.sum() + h.sum()).backward()
            assert r.grad.shape == r.shape and h.shape == x.shape
        else:
            y = accel_torch.rmsnorm(x, w)
            y.sum().backward()
        assert y.shape == x.shape and y.dtype == x.dtype
        assert x.grad.shape == x.shape and w.grad.shape == w.shape


@needs_interpreter
def test_dtensor_takes_the_custom_ops(monkeypatch):
    """DTensor inputs never reach the eager Function or the raw launcher (they cannot see
    the sharding); the custom ops and their sharding rules serve them."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, distribute_tensor

    pytest.importorskip("accel_torch.sharding", reason="needs the ops' sharding rules")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        x, w, _r, v = _inputs(9)

        def refusing_dtensors(fn):
            def guarded(*args):
                if any(isinstance(a, DTensor) for a in args):
                    raise AssertionError(f"a DTensor reached {fn.__name__}")
                return fn(*args)

            return guarded

        monkeypatch.setattr(ops, "rmsnorm_fwd_launch", refusing_dtensors(ops.rmsnorm_fwd_launch))
        monkeypatch.setattr(ops, "rmsnorm_bwd_launch", refusing_dtensors(ops.rmsnorm_bwd_launch))
        monkeypatch.setattr(
            ops._KernelFunction, "apply", refusing_dtensors(ops._KernelFunction.apply)
        )
        xd = distribute_tensor(x, mesh, [Replicate()]).requires_grad_(True)
        wd = distribute_tensor(w, mesh, [Replicate()]).requires_grad_(True)
        y = accel_torch.rmsnorm(xd, wd)
        (y.to_local() * v).sum().backward()
    finally:
        dist.destroy_process_group()
    x64, w64 = leaf64(x), leaf64(w)
    y64 = rmsnorm64(x64, w64)
    (y64 * v.double()).sum().backward()
    assert_grad_close(y.to_local(), y64, REL)
    assert_grad_close(xd.grad.to_local(), x64.grad, REL)
    assert_grad_close(wd.grad.to_local(), w64.grad, REL)
