"""Edges of the JAX half: argument forms, float64, x64, higher-order autodiff, jax.export,
a JAX without the Pallas Triton backend. Each runs on both CPU paths: the kernels in Pallas
interpret mode and the reference math."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.test_util import check_grads

import accel_jax
from tests.jax.helpers import (
    assert_grad_close,
    assert_output_close,
    bwd64,
    f64,
    fwd64,
    rand,
    run_python,
)

MODES = pytest.mark.parametrize("interpret", [True, False], ids=["interpret", "reference"])
N = 24


# ------------------------------------------------------------------ argument forms


@MODES
def test_numpy_views_and_byte_orders_are_read_correctly(interpret):
    """numpy inputs of any strides (views, broadcasts, a column of a stacked layer weight,
    Fortran order) or byte order are read as their values, never as their memory."""
    rng = np.random.default_rng(0)
    x_f = np.asfortranarray(rng.standard_normal((3, N)).astype(np.float32))
    stacked = (rng.standard_normal((N, 4)) + 2).astype(np.float32)  # (N, L) layer weights
    weights = {
        "strided": (rng.standard_normal(2 * N) + 2).astype(np.float32)[::2],
        "broadcast": np.broadcast_to(np.float32(1.5), (N,)),
        "column": stacked[:, 2],
        "big-endian": (rng.standard_normal(N) + 2).astype(">f4"),
    }
    for name, w in weights.items():
        y = accel_jax.rmsnorm(x_f, w, interpret=interpret)
        ref = fwd64(jnp.asarray(np.ascontiguousarray(x_f)), None, np.array(w, np.float32))[0]
        assert_output_close(y, ref, what=name)
    r = (rng.standard_normal((N, 3)).astype(">f4")).T  # a transposed big-endian residual
    y, h = accel_jax.rmsnorm_residual_fused(x_f, r, return_residual=True, interpret=interpret)
    ref, h64, _ = fwd64(jnp.asarray(np.array(x_f)), jnp.asarray(np.array(r, np.float32)))
    np.testing.assert_array_equal(f64(h), h64)
    assert_output_close(y, ref)


@MODES
def test_flax_param_and_jax_array_scalars_are_accepted(interpret):
    x = rand(0, (2, N), jnp.float32)
    w = nnx.Param(rand(1, (N,), jnp.float32, scale=0.2, shift=1.0))
    y = accel_jax.rmsnorm(
        x, w, jnp.float32(1e-5), weight_offset=np.float32(0.5), interpret=interpret
    )
    assert_output_close(y, fwd64(x, None, w[...], 1e-5, weight_offset=0.5)[0])


def test_flags_must_be_bools():
    x = jnp.ones((2, 8))
    y, h = accel_jax.rmsnorm_residual_fused(x, x, return_residual=np.bool_(True))
    assert y.shape == h.shape == (2, 8)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="return_residual must be True or False"):
            accel_jax.rmsnorm_residual_fused(x, x, return_residual=bad)
    with pytest.raises(TypeError, match="interpret must be True or False"):
        accel_jax.rmsnorm(x, interpret="yes")
    with pytest.raises(TypeError, match="flag must be True or False"):
        accel_jax.set_interpret("0")


def test_float64_dtype_arguments_need_x64():
    x = jnp.ones((2, 8))
    with pytest.raises(TypeError, match="residual_dtype=float64 needs jax_enable_x64"):
        accel_jax.rmsnorm_residual_fused(x, x, residual_dtype=np.float64)


# ------------------------------------------------------------ float64 and x64


@MODES
def test_float64_is_computed_in_float64(interpret):
    with jax.enable_x64(True):
        x = rand(2, (3, N), jnp.float32).astype(jnp.float64) * 3
        r = rand(3, (3, N), jnp.float32).astype(jnp.float64)
        w = rand(4, (N,), jnp.float32, scale=0.2, shift=1.0).astype(jnp.float64)
        y, h = accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True, interpret=interpret)
        assert y.dtype == h.dtype == jnp.float64
        x64, r64, w64 = (np.asarray(a) for a in (x, r, w))
        h_ref = x64 + r64
        rstd = 1 / np.sqrt(np.mean(h_ref * h_ref, axis=-1, keepdims=True) + 1e-6)
        np.testing.assert_array_equal(np.asarray(h), h_ref)
        np.testing.assert_allclose(np.asarray(y), h_ref * rstd * w64, rtol=1e-14, atol=0)

        def f(x, r, w):
            return accel_jax.rmsnorm_residual_fused(x, r, w, interpret=interpret)

        # first and second order against central differences, in float64
        check_grads(f, (x, r, w), order=2, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


@MODES
def test_float32_under_x64(interpret):
    """x64 on, fp32 inputs: the kernels (interpret mode) index with int32 as ever."""
    with jax.enable_x64(True):
        x = rand(5, (5, 40), jnp.float32)
        w = rand(6, (40,), jnp.float32, scale=0.2, shift=1.0)
        dy = rand(7, (5, 40), jnp.float32)
        y, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w, interpret=interpret), x, w)
        assert y.dtype == jnp.float32
        assert_output_close(y, fwd64(x, None, w)[0])
        dx, dw = vjp(dy)
        ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w)
        assert_grad_close(dx, ref_dx, cx, what="dx")
        assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


# ------------------------------------------------------------ higher-order autodiff


def _rms64(x, r, w, eps=1e-6):
    """The op's math in plain jnp, evaluated in float64 (the reference for derivatives)."""
    h = x + r
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps) * w


def _second_order(f, x, r, w, t):
    """grad of grad, the Hessian in x (jacfwd of jacrev) and jvp of grad, of a scalar loss."""

    def loss(x, r, w):
        return jnp.sum(jnp.sin(f(x, r, w)))

    def dw_norm(x, r, w):
        return jnp.sum(jax.grad(loss, (0, 1, 2))(x, r, w)[2] ** 2)

    gg = jax.grad(dw_norm, (0, 1, 2))(x, r, w)
    hess = jax.hessian(loss)(x, r, w)
    hvp = jax.jvp(lambda x: jax.grad(loss)(x, r, w), (x,), (t,))[1]
    return jax.tree.leaves((gg, hess, hvp))


@MODES
def test_second_derivatives_are_exact(interpret):
    x = rand(8, (2, 8), jnp.float32)
    r = rand(9, (2, 8), jnp.float32)
    w = rand(10, (8,), jnp.float32, scale=0.2, shift=1.0)
    t = rand(11, (2, 8), jnp.float32)

    def ours(x, r, w):
        return accel_jax.rmsnorm_residual_fused(x, r, w, interpret=interpret)

    got = jax.jit(lambda *a: _second_order(ours, *a))(x, r, w, t)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, r, w, t)]
        want = [np.asarray(v) for v in _second_order(_rms64, *args64)]
    # fp32 arithmetic on terms of the size of max|ref|: within 1e-4 of that, per tensor
    for g, e in zip(got, want, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(
            np.asarray(g, np.float64), e, rtol=0, atol=1e-4 * np.abs(e).max()
        )


@MODES
def test_third_order_reverse_mode(interpret):
    x = rand(12, (2, 6), jnp.float32)

    def d3(f):
        g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))
        g2 = jax.grad(lambda x: jnp.sum(g(x) ** 2))
        return jax.grad(lambda x: jnp.sum(jnp.cos(g2(x))))

    got = jax.jit(d3(lambda x: accel_jax.rmsnorm(x, interpret=interpret)))(x)
    with jax.enable_x64(True):
        want = np.asarray(
            d3(lambda x: _rms64(x, 0.0, 1.0))(jnp.asarray(np.asarray(x), jnp.float64))
        )
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=0, atol=1e-3 * np.abs(want).max()
    )


@MODES
def test_forward_mode_of_the_op_is_refused_clearly(interpret):
    x = rand(13, (2, 8), jnp.float32)
    f = lambda x: accel_jax.rmsnorm(x, interpret=interpret)  # noqa: E731
    for transform in (lambda: jax.jvp(f, (x,), (x,)), lambda: jax.jacfwd(f)(x)):
        with pytest.raises(TypeError, match=r"forward-mode autodiff \(jvp\)"):
            transform()
    # reverse mode, and jacrev in place of jacfwd, work
    assert jax.jacrev(f)(x).shape == (2, 8, 2, 8)


# --------------------------------------------------------------------- jax.export


@MODES
def test_export_with_a_symbolic_batch(interpret):
    """Symbolic dimensions reach the reference math (the kernels need static shapes)."""
    w = rand(14, (N,), jnp.float32, scale=0.2, shift=1.0)

    def loss(x, w):
        return jnp.sum(jnp.sin(accel_jax.rmsnorm(x, w, interpret=interpret)))

    def step(x, w):
        return accel_jax.rmsnorm(x, w, interpret=interpret), jax.grad(loss, (0, 1))(x, w)

    spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {N}"), jnp.float32)
    exp = export.export(jax.jit(step))(spec, jax.ShapeDtypeStruct((N,), jnp.float32))
    for b in (1, 5):
        x = rand(15 + b, (b, N), jnp.float32)
        y, (dx, dw) = exp.call(x, w)
        assert_output_close(y, fwd64(x, None, w)[0])
        y_eager, (dx_eager, dw_eager) = step(x, w)
        np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_eager), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_eager), rtol=1e-5, atol=1e-6)


# ------------------------------------------------- no Pallas Triton backend


BLOCK_PALLAS_TRITON = textwrap.dedent(
    """
    import sys, warnings
    import importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        BLOCKED = ("jax.experimental.pallas.triton", "jax._src.pallas.triton")

        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                raise ImportError(f"No module named {name!r} (simulated)")
            return None

    sys.meta_path.insert(0, Block())
    warnings.simplefilter("always")
    """
)

NO_TRITON_SCRIPT = BLOCK_PALLAS_TRITON + textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    with warnings.catch_warnings(record=True) as caught:
        import accel_jax
        x = jax.random.normal(jax.random.key(0), (3, 16))
        w = 1 + 0.1 * jax.random.normal(jax.random.key(1), (16,))
        y = accel_jax.rmsnorm(x, w, interpret=True)
        g = jax.grad(lambda x: jnp.sum(accel_jax.rmsnorm(x, w, interpret=True) ** 2))(x)
        y2 = accel_jax.rmsnorm_residual_fused(x, x, w, interpret=True)
    ref = accel_jax.rmsnorm_reference(x, w)
    ref_g = jax.grad(lambda x: jnp.sum(accel_jax.rmsnorm_reference(x, w) ** 2))(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-5, atol=1e-6)
    mine = [str(m.message) for m in caught if "accel_jax" in str(m.message)]
    assert len(mine) == 1, mine
    assert "no Pallas Triton backend" in mine[0] and "reference math" in mine[0], mine[0]
    assert "simulated" in mine[0], mine[0]
    print("OK")
    """
)

# With ACCEL_JAX_BACKEND=mosaic_gpu, interpreted: the Mosaic GPU kernels where they serve the
# shape (4x1024 bf16: forward and backward), the reference math elsewhere (3x16), no Pallas
# Triton kernel anywhere; values against the float64 reference.
NO_TRITON_MOSAIC_SCRIPT = BLOCK_PALLAS_TRITON + textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    from tests.jax.helpers import assert_grad_close, assert_output_close, bwd64, fwd64, rand
    with warnings.catch_warnings(record=True) as caught:
        import accel_jax
        from accel_jax import kernels, kernels_mgpu
        assert kernels.UNAVAILABLE and "simulated" in kernels.UNAVAILABLE
        for shape, mosaic in (((4, 1024), 2), ((3, 16), 0)):
            x = rand(1, shape, jnp.bfloat16)
            r = rand(2, shape, jnp.bfloat16)
            w = rand(3, shape[-1:], jnp.bfloat16, scale=0.2, shift=1.0)
            dy = rand(4, shape, jnp.bfloat16)

            def step(x, r, w):
                f = lambda x, r, w: accel_jax.rmsnorm_residual_fused(
                    x, r, w, interpret=True, return_residual=True
                )
                (y, h), vjp = jax.vjp(f, x, r, w)
                return y, h, *vjp((dy, jnp.zeros_like(h)))

            jaxpr = str(jax.make_jaxpr(step)(x, r, w))
            kernels = re.findall(r"\\bname=rmsnorm\\w*_mgpu\\b", jaxpr)
            assert len(kernels) == mosaic, (shape, kernels)
            assert "triton" not in jaxpr, shape
            y, h, dx, dr, dw = jax.jit(step)(x, r, w)
            ref, h64, _ = fwd64(x, r, w)
            np.testing.assert_array_equal(np.asarray(h, np.float64), h64)
            assert_output_close(y, ref)
            ref_dx, ref_dw, cx, cw = bwd64(dy, h64, w)
            assert_grad_close(dx, ref_dx, cx, what="dx")
            np.testing.assert_array_equal(np.asarray(dx), np.asarray(dr))
            assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")
    mine = [str(m.message) for m in caught if "accel_jax" in str(m.message)]
    assert len(mine) == 1, mine
    assert "no Pallas Triton backend" in mine[0] and "Mosaic GPU kernels" in mine[0], mine[0]
    print("OK")
    """
)


def test_without_the_pallas_triton_backend_one_warning_and_the_reference_math():
    run_python(NO_TRITON_SCRIPT, JAX_PLATFORMS="cpu")


@pytest.mark.skipif(
    accel_jax.kernels_mgpu.INTERPRET_UNAVAILABLE is not None, reason="no Mosaic GPU interpret mode"
)
def test_without_the_pallas_triton_backend_the_mosaic_gpu_kernels_where_they_serve():
    run_python(NO_TRITON_MOSAIC_SCRIPT, JAX_PLATFORMS="cpu", ACCEL_JAX_BACKEND="mosaic_gpu")


@pytest.mark.parametrize(
    "rows, x_dtype, residual_dtype",
    [
        (2**31 // 4096 - 1, jnp.bfloat16, None),  # just under 2^32 bytes
        (2**31 // 4096, jnp.bfloat16, None),
        (2**30 // 4096, jnp.bfloat16, jnp.float32),  # h in fp32 reaches 2^32 bytes
        (3 * 2**30 // 4096, jnp.float32, None),
    ],
)
def test_compiled_path_is_one_launch_at_and_past_2_pow_32_bytes(
    monkeypatch, rows, x_dtype, residual_dtype
):
    """Where the compiled kernels would run (a GPU, simulated: only traced, never lowered),
    arrays of 2^32 bytes or more take the kernels in one launch, as smaller ones do (their
    64-bit offsets measured right on the H200, bench/NOTES.md), never the reference math."""
    from accel_jax import ops

    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    x = jax.ShapeDtypeStruct((rows, 4096), x_dtype)
    w = jax.ShapeDtypeStruct((4096,), jnp.float32)
    if residual_dtype is None:
        jaxpr = jax.make_jaxpr(lambda x, w: accel_jax.rmsnorm(x, w, interpret=False))(x, w)
    else:
        jaxpr = jax.make_jaxpr(
            lambda x, w: accel_jax.rmsnorm_residual_fused(
                x, x, w, residual_dtype=residual_dtype, interpret=False
            )
        )(x, w)
    assert str(jaxpr).count("pallas_call") == 1
