"""The Mosaic GPU forward and backward through the public ops with
ACCEL_JAX_BACKEND=mosaic_gpu, against the float64 reference: on a GPU compiled, at real sizes
(marked gpu) and small ones; on the CPU the small ones in Mosaic GPU's interpret mode (every
warpgroup a thread, shared memory and barriers simulated), each kernel variant at least once:
rows in registers (4 or 2 rows a program), rows in several warpgroups (the grouped kernels)
and rows in column chunks (the two-walk kernels), ragged row counts, and backward programs
that each walk several rows.

Run on a GPU: python -m pytest -q tests/jax/test_mgpu_values.py (-m gpu: the real sizes only)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from accel_jax import backends, kernels_mgpu
from tests.jax.helpers import (
    assert_grad_close,
    assert_llama_close,
    assert_output_close,
    bwd64,
    f64,
    fwd64,
    rand,
)

ON_GPU = jax.default_backend() == "gpu"
pytestmark = pytest.mark.skipif(
    kernels_mgpu.UNAVAILABLE is not None, reason="this JAX has no Pallas Mosaic GPU"
)


def _shapes(small, real):
    """Small shapes (every machine) and real sizes (marked gpu)."""
    return [pytest.param(s, id=f"small{s}") for s in small] + [
        pytest.param(s, id=str(s), marks=pytest.mark.gpu) for s in real
    ]


# Ragged row counts (the last program starts early), 4 and 2 rows per program; loads
# narrower than 16 bytes (2880: 4-byte 16-bit loads; 128, a head's width: 8-byte); rows past
# MAX_COLS held by two warpgroups (12288, 16384) or in column chunks (16896: no split into
# whole segments; four chunks and a narrower last one).
SHAPES = _shapes(
    [(7, 512), (3, 5120), (6, 2880), (5, 128), (3, 12288), (3, 16896)],
    [(2048, 4096), (8195, 4096), (4096, 5120), (1027, 8192), (4097, 3584), (4, 256)]
    + [(4096, 2880), (8195, 128), (1027, 12288), (1027, 16384), (33, 16896)],
)
DTYPES = [jnp.bfloat16, jnp.float32, jnp.float16]
# Backward programs on the CPU: this few, so that each walks several rows (on a GPU the
# real sizes have more rows than programs).
CPU_BWD_PROGRAMS = 2


@pytest.fixture(autouse=True)
def _mosaic_gpu(monkeypatch):
    """ACCEL_JAX_BACKEND=mosaic_gpu, compiled on a GPU, interpreted elsewhere."""
    if not ON_GPU:
        if kernels_mgpu.INTERPRET_UNAVAILABLE:
            pytest.skip(f"needs a CUDA GPU ({kernels_mgpu.INTERPRET_UNAVAILABLE})")
        monkeypatch.setattr(kernels_mgpu, "BWD_MAX_PROGRAMS", CPU_BWD_PROGRAMS)
        monkeypatch.setattr(kernels_mgpu, "BWD_GROUP_PROGRAMS", CPU_BWD_PROGRAMS)
        jax.clear_caches()  # no op traced under other program counts is reused
    previous = accel_jax.get_interpret()
    accel_jax.set_interpret(not ON_GPU)
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "mosaic_gpu")
    yield
    accel_jax.set_interpret(previous)
    if not ON_GPU:
        jax.clear_caches()


def _mosaic_gpu_calls(f, *args) -> int:
    """Mosaic GPU kernels in f's program: its custom calls on a GPU; interpreted, the
    kernels in its jaxpr (named *_mgpu)."""
    if ON_GPU:
        return jax.jit(f).lower(*args).as_text().count("stablehlo.custom_call @mosaic_gpu")
    return len(re.findall(r"\bname=rmsnorm\w*_mgpu\b", str(jax.make_jaxpr(f)(*args))))


def _uses_mosaic_gpu(f, *args) -> bool:
    return _mosaic_gpu_calls(f, *args) > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_forward(shape, dtype):
    n = shape[-1]
    x = rand(1, shape, dtype)
    w = rand(2, (n,), dtype, scale=0.2, shift=1.0)
    f = lambda x, w: accel_jax.rmsnorm(x, w)  # noqa: E731
    assert _uses_mosaic_gpu(f, x, w) == kernels_mgpu.supported(*shape, dtype)
    assert_output_close(jax.jit(f)(x, w), fwd64(x, None, w)[0])
    y = jax.jit(lambda x, w: accel_jax.rmsnorm(x, w, casting="llama", weight_offset=1.0))(x, w)
    if dtype == jnp.float32:
        assert_output_close(y, fwd64(x, None, w, casting="llama", weight_offset=1.0)[0])
    else:
        assert_llama_close(y, x, w, weight_offset=1.0)
    assert_output_close(jax.jit(accel_jax.rmsnorm)(x), fwd64(x)[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_fused(shape):
    n = shape[-1]
    x = rand(3, shape, jnp.bfloat16)
    r = rand(4, shape, jnp.float32, scale=2.0)
    w = rand(5, (n,), jnp.float32, scale=0.2, shift=1.0)
    for residual_dtype in (None, jnp.float32):

        def f(x, r, w, residual_dtype=residual_dtype):
            return accel_jax.rmsnorm_residual_fused(
                x, r, w, weight_offset=0.5, return_residual=True, residual_dtype=residual_dtype
            )

        assert _uses_mosaic_gpu(f, x, r, w)
        y, h = jax.jit(f)(x, r, w)
        h_dtype = jnp.dtype(residual_dtype or x.dtype)
        ref, h64, _ = fwd64(x, r, w, weight_offset=0.5, round_dtype=h_dtype)
        np.testing.assert_array_equal(f64(h), h64)
        assert_output_close(y, ref)


@pytest.mark.parametrize(
    "shape", _shapes([(2, 5, 1024), (2, 6, 576), (2, 3, 12288)], [(3, 2048, 4096)])
)
def test_vmap(monkeypatch, shape):
    """vmap over a leading axis on one device: Pallas batches the Mosaic GPU kernels over
    one more grid axis (each kernel traced again). The forward with a batched weight; the
    fused op's gradients with a shared weight (its dweight summed over the batch) and with
    a batched one."""
    traced = []  # the Mosaic GPU kernels traced: (name, M, N)
    for name in ("rmsnorm_fwd", "rmsnorm_bwd"):
        kernel = getattr(kernels_mgpu, name)
        counted = lambda *a, kernel=kernel, name=name, **k: (  # noqa: E731
            traced.append((name, *a[0].shape)) or kernel(*a, **k)
        )
        monkeypatch.setattr(kernels_mgpu, name, counted)
    jax.clear_caches()
    b, n = shape[0], shape[-1]
    x = rand(21, shape, jnp.bfloat16)
    r = rand(22, shape, jnp.bfloat16)
    ws = rand(23, (b, n), jnp.bfloat16, scale=0.2, shift=1.0)
    dy = rand(24, shape, jnp.bfloat16)

    vmapped = jax.vmap(lambda x, w: accel_jax.rmsnorm(x, w, casting="llama"))
    assert _mosaic_gpu_calls(vmapped, x, ws) == 1  # batched, under its own name
    plain = jax.jit(vmapped)(x, ws)
    for i in range(b):
        assert_llama_close(plain[i], x[i], ws[i])

    def fused(x, r, w):
        return accel_jax.rmsnorm_residual_fused(x, r, w, weight_offset=0.5, return_residual=True)

    for w_axis in (None, 0):
        w = ws[0] if w_axis is None else ws
        (y, h), vjp = jax.vjp(jax.vmap(fused, in_axes=(0, 0, w_axis)), x, r, w)
        dx, dr, dw = jax.jit(vjp)((dy, h))
        np.testing.assert_array_equal(np.asarray(dx), np.asarray(dr))
        for i in range(b):
            wi = w if w_axis is None else w[i]
            ref, h64, _ = fwd64(x[i], r[i], wi, weight_offset=0.5)
            np.testing.assert_array_equal(f64(h[i]), h64)
            assert_output_close(y[i], ref)
            ref_dx, _, cx, _ = bwd64(dy[i], h64, wi, weight_offset=0.5, dh=h[i])
            assert_grad_close(dx[i], ref_dx, cx, what="dx")
            if w_axis is not None:
                _, ref_dw, _, cw = bwd64(dy[i], h64, wi, weight_offset=0.5)
                assert_grad_close(dw[i], ref_dw, cw, per_row=False, what="dweight")
        if w_axis is None:  # dweight of the shared weight: every example's rows
            rows = lambda a: np.asarray(a).reshape(-1, n)  # noqa: E731
            h64 = np.concatenate([fwd64(x[i], r[i])[1] for i in range(b)])
            _, ref_dw, _, cw = bwd64(rows(dy), h64, w, weight_offset=0.5)
            assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")
    m = shape[1]
    assert traced.count(("rmsnorm_fwd", m, n)) == 3  # plain, fused twice
    assert traced.count(("rmsnorm_bwd", m, n)) == 2


# Row counts not a multiple of the G programs, more programs than rows (3), 1024-5120 columns;
# loads narrower than 16 bytes (896: 2-byte 16-bit loads; 3584: 8-byte), in blocks of two
# rows (576, 64: a head's width) or four (96); past BWD_MAX_COLS
# held by several warpgroups (7168: seven, 8192: four, 12288: six) or in column chunks (9216:
# no split into whole segments, 3072-column chunks; 16384: past BWD_GROUP_MAX_COLS,
# 4096-column chunks).
BWD_SHAPES = _shapes(
    [(5, 1024), (3, 5120), (5, 896), (6, 576), (8, 96), (5, 6144), (3, 9216)],
    [(2048, 4096), (8195, 4096), (1027, 5120), (4099, 1024), (1025, 2048), (3, 5120)]
    + [(4096, 896), (2051, 3584), (4096, 576), (32768, 64), (4096, 96)]
    + [(1027, 7168), (130, 8192), (257, 12288), (300, 16384), (3, 9216)],
)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["mosaic_gpu", "auto"])
@pytest.mark.parametrize("shape", [(8195, 4096), (2051, 5120)], ids=str)
def test_fused_backward_from_its_saved_rstd(monkeypatch, shape, backend):
    """The Mosaic GPU backward (forced, or auto at 8195x4096) or the Triton-lowered one (auto
    at 2051x5120) from the rstd and h that the Mosaic GPU forward saved."""
    monkeypatch.setenv("ACCEL_JAX_BACKEND", backend)
    n = shape[-1]
    x = rand(9, shape, jnp.bfloat16)
    r = rand(10, shape, jnp.bfloat16)
    w = rand(11, (n,), jnp.bfloat16, scale=0.2, shift=1.0)
    dy = rand(12, shape, jnp.bfloat16)
    f = lambda x, r, w: accel_jax.rmsnorm_residual_fused(x, r, w)  # noqa: E731
    assert _mosaic_gpu_calls(f, x, r, w) == 1
    _, vjp = jax.vjp(f, x, r, w)
    mgpu_bwd = backends.backward_kernels(*shape, [jnp.bfloat16], backend) is kernels_mgpu
    assert mgpu_bwd == (backend == "mosaic_gpu" or shape == (8195, 4096))
    assert _mosaic_gpu_calls(vjp, dy) == mgpu_bwd
    dx, dr, dw = jax.jit(vjp)(dy)
    _, h64, _ = fwd64(x, r, w)
    ref, ref_dw, cx, cw = bwd64(dy, h64, w)
    assert_grad_close(dx, ref, cx, what="dx")
    assert_grad_close(dr, ref, cx, what="dresidual")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("shape", BWD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_backward(shape, dtype):
    n = shape[-1]
    x = rand(13, shape, dtype)
    w = rand(14, (n,), dtype, scale=0.2, shift=1.0)
    dy = rand(15, shape, dtype)
    f = lambda x, w: accel_jax.rmsnorm(x, w, weight_offset=0.5)  # noqa: E731
    _, vjp = jax.vjp(f, x, w)
    served = kernels_mgpu.supported_bwd(*shape, dtype)
    assert (_mosaic_gpu_calls(vjp, dy) == 1) == served
    dx, dw = jax.jit(vjp)(dy)
    ref, ref_dw, cx, cw = bwd64(dy, f64(x), w, weight_offset=0.5)
    assert_grad_close(dx, ref, cx, what="dx")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")
    # deterministic dweight: the same bits again
    np.testing.assert_array_equal(np.asarray(jax.jit(vjp)(dy)[1]), np.asarray(dw))
    # no weight
    _, vjp = jax.vjp(accel_jax.rmsnorm, x)
    (dx,) = jax.jit(vjp)(dy)
    ref, _, cx, _ = bwd64(dy, f64(x))
    assert_grad_close(dx, ref, cx, what="dx without weight")


@pytest.mark.parametrize("shape", _shapes([(5, 1024), (5, 6144)], [(4099, 1024), (1027, 4096)]))
def test_fused_backward_with_fp32_residual(shape):
    """d residual written in fp32 beside dx in bf16, both with dh added."""
    n = shape[-1]
    x = rand(16, shape, jnp.bfloat16)
    r = rand(17, shape, jnp.float32)
    w = rand(18, (n,), jnp.float32, scale=0.2, shift=1.0)
    dy = rand(19, shape, jnp.bfloat16)
    dh = rand(20, shape, jnp.bfloat16)

    def f(x, r, w):
        return accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)

    (_, h), vjp = jax.vjp(f, x, r, w)
    assert h.dtype == jnp.bfloat16
    assert _mosaic_gpu_calls(vjp, (dy, dh)) == 1
    dx, dr, dw = jax.jit(vjp)((dy, dh))
    assert dx.dtype == jnp.bfloat16 and dr.dtype == jnp.float32
    ref, ref_dw, cx, cw = bwd64(dy, f64(h), w, dh=dh)
    assert_grad_close(dx, ref, cx, what="dx")
    assert_grad_close(dr, ref, cx, what="dresidual")
    assert_grad_close(dw, ref_dw, cw, per_row=False, what="dweight")


@pytest.mark.gpu
def test_auto_picks_mosaic_gpu_for_large_fused_on_hopper(monkeypatch):
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "auto")
    hopper = backends.hopper_or_newer()
    x = rand(6, (4096, 4096), jnp.bfloat16)
    fused = lambda x: accel_jax.rmsnorm_residual_fused(x, x)  # noqa: E731
    assert _uses_mosaic_gpu(fused, x) == hopper
    assert not _uses_mosaic_gpu(lambda x: accel_jax.rmsnorm(x), x)
    assert not _uses_mosaic_gpu(fused, x[:256])


@pytest.mark.gpu
def test_auto_picks_mosaic_gpu_for_the_plain_forward_at_4608_to_7168_columns(monkeypatch):
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "auto")
    hopper = backends.hopper_or_newer()
    for shape, expected in [((4096, 5120), hopper), ((4099, 7168), hopper), ((4096, 4096), False)]:
        x = rand(7, shape, jnp.bfloat16)
        w = rand(8, shape[-1:], jnp.bfloat16, scale=0.2, shift=1.0)
        f = lambda x, w: accel_jax.rmsnorm(x, w)  # noqa: E731
        assert _uses_mosaic_gpu(f, x, w) == expected, shape
        assert_output_close(jax.jit(f)(x, w), fwd64(x, None, w)[0])
