"""jit / grad / vmap / checkpoint / scan, dispatch, the warning filter and sharded inputs."""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from accel_jax import kernels, ops
from tests.jax.helpers import (
    assert_grad_close,
    assert_output_close,
    bwd64,
    f64,
    fwd64,
    rand,
    run_python,
)

N = 96


def _inputs(dtype=jnp.float32, shape=(6, N)):
    return (
        rand(0, shape, dtype),
        rand(1, shape, dtype),
        rand(2, (shape[-1],), jnp.float32, scale=0.2, shift=1.0),
    )


def _loss(x, r, w):
    """Linear in y and h, so the cotangents reaching the op are exact under any fusion."""
    y, h = accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)
    cy = jnp.linspace(-1.0, 1.0, y.size).reshape(y.shape)
    ch = jnp.linspace(0.5, -0.5, h.size).reshape(h.shape)
    return jnp.sum(y.astype(jnp.float32) * cy) + jnp.sum(h.astype(jnp.float32) * ch)


def test_jit_matches_eager():
    x, r, w = _inputs(jnp.bfloat16)
    eager = accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)
    jitted = jax.jit(
        lambda x, r, w: accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)
    )(x, r, w)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grad_under_jit_matches_eager_grad():
    x, r, w = _inputs()
    g_eager = jax.grad(_loss, argnums=(0, 1, 2))(x, r, w)
    g_jit = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))(x, r, w)
    # Interpreted kernels are XLA:CPU code, whose FMA contraction depends on the fusion
    # around them: eager and jitted may differ in the last fp32 bit or two.
    for a, b in zip(g_eager, g_jit, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_axes", [(0, 0, None), (1, 1, None), (0, None, None), (0, 0, 0)])
def test_vmap(in_axes):
    """vmap over any axis of x / residual, and over a batch of weights."""
    b = 3
    x = rand(3, (b, 4, N), jnp.float32)
    r = rand(4, (b, 4, N), jnp.float32)
    w = rand(5, (b, N), jnp.float32, scale=0.2, shift=1.0)
    if in_axes[0] == 1:
        x, r = jnp.swapaxes(x, 0, 1), jnp.swapaxes(r, 0, 1)
    args = [x, r if in_axes[1] is not None else r[0], w if in_axes[2] is not None else w[0]]

    def f(x, r, w):
        return accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)

    def example(args, i):
        return [
            t if ax is None else jnp.take(t, i, axis=ax)
            for t, ax in zip(args, in_axes, strict=True)
        ]

    y, h = jax.vmap(f, in_axes=in_axes)(*args)
    for i in range(b):
        ye, he = f(*example(args, i))
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(ye))
        np.testing.assert_array_equal(np.asarray(h[i]), np.asarray(he))

    # gradients through vmap equal the sum of per-example gradients
    def batched_loss(*a):
        return jnp.sum(jax.vmap(f, in_axes=in_axes)(*a)[0] ** 2)

    def looped_loss(*a):
        return sum(jnp.sum(f(*example(a, i))[0] ** 2) for i in range(b))

    gv = jax.grad(batched_loss, argnums=(0, 1, 2))
    gl = jax.grad(looped_loss, argnums=(0, 1, 2))
    for a, e in zip(gv(*args), gl(*args), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


def test_checkpoint():
    x, r, w = _inputs()
    plain = jax.grad(_loss, argnums=(0, 1, 2))(x, r, w)
    remat = jax.grad(jax.checkpoint(_loss), argnums=(0, 1, 2))(x, r, w)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scan_layer_stack():
    """A stack of pre-norm residual blocks in lax.scan: forward and gradients vs float64."""
    layers, m = 3, 5
    x0 = rand(6, (m, N), jnp.float32)
    ws = rand(7, (layers, N), jnp.float32, scale=0.2, shift=1.0)
    mats = rand(8, (layers, N, N), jnp.float32, scale=0.1)

    def block(carry, params):
        h, delta = carry
        w, a = params
        y, h = accel_jax.rmsnorm_residual_fused(delta, h, w, return_residual=True)
        return (h, jnp.tanh(y @ a)), None

    def model(x0, ws, mats):
        (h, delta), _ = jax.lax.scan(block, (x0, jnp.zeros_like(x0)), (ws, mats))
        return jnp.sum(accel_jax.rmsnorm(h + delta) ** 2)

    def model_unrolled(x0, ws, mats):
        carry = (x0, jnp.zeros_like(x0))
        for i in range(layers):
            carry, _ = block(carry, (ws[i], mats[i]))
        h, delta = carry
        return jnp.sum(accel_jax.rmsnorm(h + delta) ** 2)

    def model_ref(x0, ws, mats):
        h, delta = x0, jnp.zeros_like(x0)
        for i in range(layers):
            y, h = accel_jax.rmsnorm_residual_reference(delta, h, ws[i], return_residual=True)
            delta = jnp.tanh(y @ mats[i])
        return jnp.sum(accel_jax.rmsnorm_reference(h + delta) ** 2)

    v_scan, g_scan = jax.jit(jax.value_and_grad(model, argnums=(0, 1, 2)))(x0, ws, mats)
    v_unr, g_unr = jax.value_and_grad(model_unrolled, argnums=(0, 1, 2))(x0, ws, mats)
    v_ref, g_ref = jax.value_and_grad(model_ref, argnums=(0, 1, 2))(x0, ws, mats)
    np.testing.assert_allclose(float(v_scan), float(v_unr), rtol=1e-6)
    np.testing.assert_allclose(float(v_scan), float(v_ref), rtol=1e-5)
    for a, b, c in zip(g_scan, g_unr, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)


def test_reference_autodiff_agrees_with_custom_vjp():
    """rmsnorm_reference is differentiated by JAX itself: the same gradient as ours."""
    x, r, w = _inputs()
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(accel_jax.rmsnorm(x, w))), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(accel_jax.rmsnorm_reference(x, w))), (0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU dispatch")
def test_dispatch_on_cpu(monkeypatch):
    """CPU: interpret mode runs pallas_call; otherwise the reference, with no pallas_call."""
    x, _, w = _inputs()

    def jaxpr_text(**kw):
        return str(jax.make_jaxpr(lambda x, w: accel_jax.rmsnorm(x, w, **kw))(x, w))

    assert "pallas_call" in jaxpr_text(interpret=True)
    assert "pallas_call" not in jaxpr_text(interpret=False)
    previous = accel_jax.get_interpret()
    try:
        accel_jax.set_interpret(True)
        assert "pallas_call" in jaxpr_text()
        accel_jax.set_interpret(False)
        assert "pallas_call" not in jaxpr_text()
    finally:
        accel_jax.set_interpret(previous)
    # and both paths agree with float64
    for interpret in (True, False):
        assert_output_close(accel_jax.rmsnorm(x, w, interpret=interpret), fwd64(x, None, w)[0])


def test_env_var_read_at_import():
    code = "import accel_jax; print(accel_jax.get_interpret())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = dict(os.environ, ACCEL_INTERPRET=value, JAX_PLATFORMS="cpu")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_triton_deprecation_warning_is_filtered_and_others_are_not():
    """The filter matches that one message (JAX >= 0.11 raises it when a Pallas Triton kernel
    lowers); other warnings, other DeprecationWarnings included, still show."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.quiet_triton_deprecation()
        warnings.warn(
            "The Pallas Triton backend is deprecated and will be removed in a future JAX version.",
            DeprecationWarning,
            stacklevel=2,
        )
        warnings.warn("some other deprecation", DeprecationWarning, stacklevel=2)
        warnings.warn(
            "The Pallas Triton backend is deprecated (as a UserWarning)", UserWarning, stacklevel=2
        )
        warnings.warn("an ordinary warning", stacklevel=2)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "some other deprecation",
        "The Pallas Triton backend is deprecated (as a UserWarning)",
        "an ordinary warning",
    ]


def test_no_other_warnings_from_a_call():
    x, r, w = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.grad(_loss, argnums=(0, 1, 2))(x, r, w))
    assert [str(w.message) for w in caught] == []


SHARDING_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import accel_jax

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    key = jax.random.key(0)
    x = jax.random.normal(key, (8, 6, 64), jnp.float32)
    r = jax.random.normal(jax.random.key(1), (8, 6, 64), jnp.float32)
    w = 1 + 0.2 * jax.random.normal(jax.random.key(2), (64,), jnp.float32)

    def loss(x, r, w):
        y, h = accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h * h), (y, h)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (v0, (y0, h0)), g0 = f(x, r, w)
    for spec in (P("data"), P("data", "model"), P(None, None, "model"), P(("data", "model"))):
        s = NamedSharding(mesh, spec)
        xs, rs = jax.device_put(x, s), jax.device_put(r, s)
        ws = jax.device_put(w, NamedSharding(mesh, P()))
        (v, (y, h)), g = f(xs, rs, ws)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(h), np.asarray(h0))
        for a, b in zip(g, g0):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # arrays committed to different devices: a clear error naming the argument
    xa = jax.device_put(x, jax.devices()[0])
    ra = jax.device_put(r, jax.devices()[1])
    try:
        accel_jax.rmsnorm_residual_fused(xa, ra, w)
    except ValueError as e:
        assert "residual" in str(e) and "devices" in str(e), e
    else:
        raise AssertionError("no error for residual on another device")
    print("OK")
    """
)


def test_sharded_inputs_under_jit():
    """NamedSharding'd inputs on 4 virtual CPU devices (own process: XLA_FLAGS must be set
    before JAX starts) give the unsharded results, forward and gradients."""
    run_python(SHARDING_SCRIPT, ACCEL_INTERPRET=os.environ.get("ACCEL_INTERPRET", "1"))


def test_float64_style_reference_of_the_scan_helpers():
    """Guard for the helpers themselves: fwd64/bwd64 agree with finite differences."""
    x = rand(9, (2, 8), jnp.float32)
    w = rand(10, (8,), jnp.float32)
    dy = rand(11, (2, 8), jnp.float32)
    y0, _, _ = fwd64(x, None, w)
    dx, dw, cx, cw = bwd64(dy, f64(x), w)
    eps = 1e-6
    x64, w64, dy64 = f64(x), f64(w), f64(dy)

    def f(xv, wv):
        rstd = 1 / np.sqrt(np.mean(xv * xv, axis=-1, keepdims=True) + 1e-6)
        return np.sum(xv * rstd * wv * dy64)

    num_dx = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        e = np.zeros_like(x64)
        e[idx] = eps
        num_dx[idx] = (f(x64 + e, w64) - f(x64 - e, w64)) / (2 * eps)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-6, atol=1e-8)
    assert_grad_close(jnp.asarray(dx, jnp.float32), num_dx, cx)
    assert y0.shape == (2, 8) and dw.shape == (8,) and cw > 0


def _jaxlib_lowers_without_compiling():
    # Up to jaxlib 0.10.2 the Pallas Triton lowering emits Triton IR into the custom call and
    # compiles it later, on the GPU; newer jaxlibs compile while lowering (needs CUDA).
    from jax._src.lib import version as jaxlib_version

    return jaxlib_version <= (0, 10, 2)


@pytest.mark.skipif(
    jax.default_backend() == "gpu" or not _jaxlib_lowers_without_compiling(),
    reason="CPU-only check of the Triton lowering (GPU runs compile for real)",
)
@pytest.mark.parametrize("shape", [(2048, 4096), (5, 1000), (3, 1), (7, 20000)], ids=str)
def test_kernels_lower_to_triton_for_cuda(monkeypatch, shape):
    """Lower the compiled (non-interpret) kernels for CUDA on this CPU machine: every
    kernel body must be expressible in the Pallas Triton lowering (power-of-two blocks,
    supported ops), forward, fused and backward."""
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False})
    x = jnp.ones(shape, jnp.bfloat16)
    r = jnp.ones(shape, jnp.float32)
    w = jnp.ones(shape[-1:], jnp.float32)

    def train(x, r, w):
        def loss(x, r, w):
            y, h = accel_jax.rmsnorm_residual_fused(
                x, r, w, casting="llama", return_residual=True, residual_dtype=jnp.float32
            )
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

        return jax.grad(loss, argnums=(0, 1, 2))(x, r, w)

    def plain(x):
        return jax.grad(lambda x: jnp.sum(accel_jax.rmsnorm(x).astype(jnp.float32)))(x)

    # train: the forward, then the backward: dx with dweight by column programs in one
    # launch (up to BWD_COLUMN_ROWS rows), else with partials and their reduction; looped:
    # dx, partials, reduction.
    m = x.size // shape[-1]
    looped = shape[-1] > 16384
    bwd = 3 if looped else 1 if m <= kernels.BWD_COLUMN_ROWS else 2
    for f, args, kernels_expected in ((train, (x, r, w), 1 + bwd), (plain, (x,), 2)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == kernels_expected, f


@pytest.mark.skipif(
    jax.default_backend() == "gpu" or not _jaxlib_lowers_without_compiling(),
    reason="CPU-only check of the Triton lowering (GPU runs compile for real)",
)
def test_kernels_lower_to_triton_under_x64(monkeypatch):
    """jax_enable_x64 makes Python ints and loop indices int64: the kernels still lower
    (every block index is int32)."""
    with jax.enable_x64(True):
        test_kernels_lower_to_triton_for_cuda(monkeypatch, (5, 1000))
        test_kernels_lower_to_triton_for_cuda(monkeypatch, (7, 20000))
