"""accel_jax.linen.RMSNorm / accel_jax.nnx.RMSNorm against flax's own, same params."""

import inspect

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import accel_jax
from accel_jax import linen as alinen
from accel_jax import nnx as annx
from tests.jax.helpers import (
    assert_grad_close,
    assert_output_close,
    bwd64,
    f64,
    fwd64,
    is_16bit,
    rand,
)

SHAPE = (3, 4, 96)


def _flax_bound_check(ours, theirs):
    """Ours and flax's: both are within the contract's bound of the exact value (flax uses
    rsqrt and rounds once), so they are within 1 ulp (16-bit) / 2e-6 relative (fp32)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    a, b = f64(ours), f64(theirs)
    if is_16bit(ours.dtype):
        steps = np.abs(
            np.asarray(ours).view(np.int16).astype(np.int64)
            - np.asarray(theirs).view(np.int16).astype(np.int64)
        )
        assert steps.max() <= 1, steps.max()
    else:
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


DTYPE_CASES = [
    # x dtype, param_dtype, dtype
    (jnp.float32, jnp.float32, None),
    (jnp.bfloat16, jnp.float32, None),  # flax promotes: output float32
    (jnp.bfloat16, jnp.bfloat16, None),
    (jnp.bfloat16, jnp.float32, jnp.bfloat16),
    (jnp.float16, jnp.float32, jnp.float16),
    (jnp.float32, jnp.float32, jnp.bfloat16),
]


def _random_scale(params, key=5):
    scale = params["params"]["scale"]
    new = rand(key, scale.shape, jnp.float32, scale=0.2, shift=1.0).astype(scale.dtype)
    return {"params": {"scale": new}}


@pytest.mark.parametrize("xdtype,param_dtype,dtype", DTYPE_CASES, ids=str)
def test_linen_matches_flax(xdtype, param_dtype, dtype):
    x = rand(0, SHAPE, xdtype)
    ours = alinen.RMSNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype)
    theirs = fnn.RMSNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype)
    p_ours = ours.init(jax.random.key(0), x)
    p_theirs = theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = _random_scale(p_theirs)
    y_ours = ours.apply(params, x)
    y_theirs = theirs.apply(params, x)
    _flax_bound_check(y_ours, y_theirs)
    ref, _, _ = fwd64(x, None, params["params"]["scale"], 1e-5)
    assert_output_close(y_ours, ref)

    # gradients w.r.t. x and scale, same cotangent
    ct = rand(9, SHAPE, y_ours.dtype)

    def vjp(module):
        def f(x, p):
            return module.apply(p, x)

        return jax.vjp(f, x, params)[1](ct)

    (gx_o, gp_o), (gx_t, gp_t) = vjp(ours), vjp(theirs)
    assert gx_o.dtype == gx_t.dtype and gx_o.dtype == x.dtype
    gs_o, gs_t = gp_o["params"]["scale"], gp_t["params"]["scale"]
    assert gs_o.dtype == gs_t.dtype
    dx64, dw64, cx, cw = bwd64(ct, f64(x), params["params"]["scale"], 1e-5)
    assert_grad_close(gx_o, dx64, cx, what="dx")
    assert_grad_close(gs_o, dw64, cw, per_row=False, what="dscale")
    # flax's own gradient is within the same bounds of float64 up to its own rounding
    np.testing.assert_allclose(f64(gx_o), f64(gx_t), rtol=2e-2, atol=2e-2 * np.abs(dx64).max())
    np.testing.assert_allclose(f64(gs_o), f64(gs_t), rtol=1e-2, atol=1e-2 * np.abs(dw64).max())


def test_linen_without_scale_and_with_residual():
    x = rand(1, SHAPE, jnp.bfloat16)
    r = rand(2, SHAPE, jnp.bfloat16)
    mod = alinen.RMSNorm(use_scale=False)
    params = mod.init(jax.random.key(0), x)
    assert jax.tree.leaves(params) == []
    assert params == fnn.RMSNorm(use_scale=False).init(jax.random.key(0), x)
    y = mod.apply(params, x)
    assert y.dtype == jnp.bfloat16
    _flax_bound_check(y, fnn.RMSNorm(use_scale=False).apply({}, x))

    mod = alinen.RMSNorm(param_dtype=jnp.float32)
    params = _random_scale(mod.init(jax.random.key(0), x))
    y, h = mod.apply(params, x, residual=r)
    assert y.dtype == jnp.float32 and h.dtype == jnp.bfloat16
    h_ref = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    _flax_bound_check(y, fnn.RMSNorm().apply(params, h))


def test_linen_offset_and_llama():
    x = rand(3, SHAPE, jnp.bfloat16)
    mod = alinen.RMSNorm(param_dtype=jnp.bfloat16, weight_offset=1.0, casting="llama")
    params = mod.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(params["params"]["scale"]), np.ones(96))
    params = _random_scale(params)
    y = mod.apply(params, x)
    expected = accel_jax.rmsnorm(
        x, params["params"]["scale"], 1e-6, weight_offset=1.0, casting="llama"
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert accel_jax.PallasRMSNorm is alinen.RMSNorm


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(reduction_axes=(-2, -1)), "reduction_axes"),
        (dict(reduction_axes=0), "reduction_axes"),
        (dict(feature_axes=0), "feature_axes"),
        (dict(axis_index_groups=[[0, 1]]), "axis_index_groups"),
        (dict(casting="half"), "casting"),
    ],
)
def test_linen_rejects_unsupported_options(kwargs, word):
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match=word):
        alinen.RMSNorm(**kwargs).init(jax.random.key(0), x)


def test_linen_rejects_mask_and_float32_reduction_off():
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="mask"):
        alinen.RMSNorm().init(jax.random.key(0), x, mask=jnp.ones(SHAPE, bool))
    if "force_float32_reductions" in fnn.RMSNorm.__dataclass_fields__:
        with pytest.raises(ValueError, match="force_float32_reductions"):
            alinen.RMSNorm(force_float32_reductions=False).init(jax.random.key(0), x)


def test_linen_accepts_last_axis_spelled_positively():
    x = rand(4, SHAPE, jnp.float32)
    mod = alinen.RMSNorm(reduction_axes=(2,), feature_axes=[-1])
    params = mod.init(jax.random.key(0), x)
    _flax_bound_check(mod.apply(params, x), fnn.RMSNorm().apply(params, x))


def test_linen_in_a_jitted_train_step():
    x = rand(5, SHAPE, jnp.float32)
    mod = alinen.RMSNorm()
    params = _random_scale(mod.init(jax.random.key(0), x))

    @jax.jit
    def step(p):
        return jax.grad(lambda p: jnp.sum(mod.apply(p, x) ** 2))(p)

    g_ours = step(params)
    g_flax = jax.grad(lambda p: jnp.sum(fnn.RMSNorm().apply(p, x) ** 2))(params)
    np.testing.assert_allclose(
        np.asarray(g_ours["params"]["scale"]),
        np.asarray(g_flax["params"]["scale"]),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("xdtype,param_dtype,dtype", DTYPE_CASES, ids=str)
def test_nnx_matches_flax(xdtype, param_dtype, dtype):
    x = rand(6, SHAPE, xdtype)
    ours = annx.RMSNorm(96, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    theirs = nnx.RMSNorm(96, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    s_ours, s_theirs = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    scale = rand(7, (96,), jnp.float32, scale=0.2, shift=1.0).astype(param_dtype)
    ours.scale[...] = scale
    theirs.scale[...] = scale
    y_ours, y_theirs = ours(x), theirs(x)
    _flax_bound_check(y_ours, y_theirs)

    def loss(model, x):
        return jnp.sum(model(x).astype(jnp.float32) * jnp.linspace(-1, 1, x.size).reshape(SHAPE))

    g_ours = nnx.grad(loss)(ours, x)
    g_theirs = nnx.grad(loss)(theirs, x)
    gs_o, gs_t = g_ours["scale"][...], g_theirs["scale"][...]
    assert gs_o.dtype == gs_t.dtype and gs_o.shape == (96,)
    np.testing.assert_allclose(f64(gs_o), f64(gs_t), rtol=1e-2, atol=1e-2 * np.abs(f64(gs_t)).max())


def test_nnx_residual_no_scale_and_errors():
    x = rand(8, SHAPE, jnp.bfloat16)
    r = rand(9, SHAPE, jnp.bfloat16)
    mod = annx.RMSNorm(96, use_scale=False, rngs=nnx.Rngs(0))
    assert mod.scale is None
    _flax_bound_check(mod(x), nnx.RMSNorm(96, use_scale=False, rngs=nnx.Rngs(0))(x))
    y, h = mod(x, residual=r)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.bfloat16
    y2 = accel_jax.rmsnorm_residual_fused(x, r)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))

    with pytest.raises(NameError, match="unbound axis name: b"):  # as flax's, outside vmap
        annx.RMSNorm(96, axis_name="b", rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="reduction_axes"):
        annx.RMSNorm(96, reduction_axes=0, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="casting"):
        annx.RMSNorm(96, casting="x", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features"):
        annx.RMSNorm(32, rngs=nnx.Rngs(0))(x)


def test_modules_keep_an_fp32_residual_stream():
    x = rand(10, SHAPE, jnp.bfloat16)
    r = rand(11, SHAPE, jnp.float32)
    h_ref = x.astype(jnp.float32) + r  # h rounded once, to fp32: exact here
    y_ref, h_fn = accel_jax.rmsnorm_residual_fused(
        x, r, return_residual=True, residual_dtype=jnp.float32
    )
    np.testing.assert_array_equal(np.asarray(h_fn), np.asarray(h_ref))

    lin = alinen.RMSNorm(use_scale=False, residual_dtype=jnp.float32)
    y, h = lin.apply({}, x, residual=r)
    assert h.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))

    mod = annx.RMSNorm(SHAPE[-1], use_scale=False, residual_dtype=jnp.float32, rngs=nnx.Rngs(0))
    y, h = mod(x, residual=r)
    assert h.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))


def test_residual_is_keyword_only_and_a_positional_second_argument_means_mask():
    """flax's second argument is mask (positional in nnx, keyword in linen): never a residual."""
    x = rand(12, SHAPE, jnp.float32)
    r = rand(13, SHAPE, jnp.float32)
    mod = annx.RMSNorm(SHAPE[-1], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask is not supported"):
        mod(x, r)  # flax: mod(x, mask)
    with pytest.raises(ValueError, match="mask is not supported"):
        mod(x, jnp.ones(SHAPE, bool))
    y, h = mod(x, residual=r)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(accel_jax.rmsnorm_residual_fused(x, r)))
    lin = alinen.RMSNorm(use_scale=False)
    with pytest.raises(TypeError):
        lin.apply({}, x, r)
    with pytest.raises(ValueError, match="mask is not supported"):
        lin.apply({}, x, mask=jnp.ones(SHAPE, bool))
    y, h = lin.apply({}, x, residual=r)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(x + r))


def test_nnx_signature_shows_flaxs_arguments():
    ours = inspect.signature(annx.RMSNorm.__init__).parameters
    theirs = inspect.signature(nnx.RMSNorm.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].kind == p.kind and ours[name].default is p.default, name
    for name in ("weight_offset", "casting", "residual_dtype"):
        assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY
    call = inspect.signature(annx.RMSNorm.__call__).parameters
    assert list(call)[:3] == ["self", "x", "mask"]
    assert call["residual"].kind == inspect.Parameter.KEYWORD_ONLY
