"""The single-block backward's two dweight reductions: column programs of its own launch
(at most BWD_COLUMN_ROWS rows) and per-program partials plus a reduce kernel (more rows).

The kernel is called directly (interpret mode, eager: every call traces afresh, so a
patched threshold takes effect), each case on both sides of the threshold: at m rows (column
programs, one launch) and at m - 1 (partials, two launches).
"""

import itertools
import os
import platform
from unittest import mock

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from accel_jax import kernels
from accel_jax.reference import reference_fwd
from tests.jax.helpers import DTYPES, assert_grad_close, bwd64, dtype_name, f64, rand, run_python

# Ragged against the 32-row and 32-column tiles, and under them.
SHAPES = list(itertools.product((1, 5, 33, 40), (1, 20, 96, 130)))
# 64-column tiles (past 4096 columns); two chunks per row (past BWD_MAX_CHUNK).
WIDE = [(3, 4100), (2, 9000)]
# (dtype, weight dtype, weight_offset, dh present, dres_dtype): Gemma's offset, the fused
# op's dh added to dx, and d residual written a second time in another dtype.
VARIANTS = {
    "bf16-f32w-offset": (jnp.bfloat16, jnp.float32, 1.0, False, None),
    "f16-offset-dh": (jnp.float16, jnp.float16, 0.5, True, None),
    "bf16-dh-f32res": (jnp.bfloat16, jnp.bfloat16, 0.0, True, jnp.float32),
    "f32-offset-dh-bf16res": (jnp.float32, jnp.float32, 1.0, True, jnp.bfloat16),
}
VARIANT_SHAPES = [(5, 130), (33, 20), (40, 96), (3, 4100)]
LOOP_SHAPES = [(40, 130), (33, 96)]  # row blocks > programs with BWD_MAX_PROGRAMS = 1


def _inputs(m, n, variant, exact=False):
    """(dy, x, rstd, w, dh or None) of a case; exact: values in multiples of 1/8, so that
    every row sum of dy * w * x is exact in fp32 (the same bits in any order)."""
    dtype, wdtype, offset, fused, _ = variant

    def make(key, shape, dt, **kw):
        a = rand(key, shape, jnp.float32, **kw)
        return (jnp.round(a * 8) / 8 if exact else a).astype(dt)

    x = make(30, (m, n), dtype)
    w = make(31, (n,), wdtype, scale=0.2, shift=1.0 - offset)
    dy = make(32, (m, n), dtype)
    dh = make(33, (m, n), dtype) if fused else None
    _, _, rstd = reference_fwd(
        x, None, w, eps=1e-6, weight_offset=offset, llama=False, out_dtype=dtype,
        round_dtype=dtype, need_h=False,
    )  # fmt: skip
    return dy, x, rstd, w, dh


def _plain(dtype):
    return (dtype, dtype, 0.0, False, None)


def _bwd_fn(variant):
    """kernels.rmsnorm_bwd as a function of (dy, x, rstd, w, dh)."""
    _, _, offset, _, dres_dtype = variant

    def f(dy, x, rstd, w, dh):
        return kernels.rmsnorm_bwd(
            dy, x, rstd, w, dh, weight_offset=offset, dx_dtype=x.dtype, dres_dtype=dres_dtype,
            interpret=True,
        )  # fmt: skip

    return f


def _launches(inputs, variant) -> int:
    """pallas_calls of the backward of these inputs (traced, not run)."""
    return _pallas_calls(jax.make_jaxpr(_bwd_fn(variant))(*inputs).jaxpr)


def _bwd(inputs, variant, column_rows):
    """(outputs, launches) of kernels.rmsnorm_bwd with BWD_COLUMN_ROWS = column_rows."""
    with mock.patch.object(kernels, "BWD_COLUMN_ROWS", column_rows):
        return _bwd_fn(variant)(*inputs), _launches(inputs, variant)


def _both_paths(inputs, variant):
    """((dx, dres, dweight) by column programs, the same by partials)."""
    m = inputs[1].shape[0]
    columns, launches = _bwd(inputs, variant, m)
    partials, launches_p = _bwd(inputs, variant, m - 1)
    assert (launches, launches_p) == (1, 2)
    return columns, partials


def _pallas_calls(jaxpr) -> int:
    """pallas_call equations in a jaxpr and the jaxprs nested in its equations."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            count += 1
            continue
        for sub in jex.core.jaxprs_in_params(eqn.params):
            count += _pallas_calls(sub)
    return count


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _check_float64(shape, variant):
    """Both reductions' dweight, dx and dres against float64."""
    inputs = _inputs(*shape, variant)
    dy, x, _, w, dh = inputs
    dres_dtype = variant[4]
    ref_dx, ref_dw, cx, cw = bwd64(dy, f64(x), w, weight_offset=variant[2], dh=dh)
    paths = zip(("columns", "partials"), _both_paths(inputs, variant), strict=True)
    for path, (dx, dres, dw) in paths:
        assert dw.shape == w.shape and dw.dtype == w.dtype, path
        assert_grad_close(dw, ref_dw, cw, per_row=False, what=f"dweight ({path})")
        assert dx.dtype == x.dtype, path
        assert_grad_close(dx, ref_dx, cx, what=f"dx ({path})")
        if dres_dtype is None:
            assert dres is None, path
        else:
            assert dres.dtype == dres_dtype, path
            assert_grad_close(dres, ref_dx, cx, what=f"dres ({path})")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES + WIDE, ids=str)
def test_column_and_partial_dweight_match_float64(shape, dtype):
    _check_float64(shape, _plain(dtype))


@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_column_dweight_with_offset_dh_and_dres(shape, variant):
    _check_float64(shape, variant)


@pytest.mark.parametrize("shape", LOOP_SHAPES, ids=str)
def test_column_dweight_when_row_programs_loop(shape, monkeypatch):
    """Row programs walking several row blocks beside the column programs."""
    monkeypatch.setattr(kernels, "BWD_MAX_PROGRAMS", 1)
    _check_float64(shape, VARIANTS["bf16-f32w-offset"])


def bit_cases():
    """(shape, variant, BWD_MAX_PROGRAMS) of every case above."""
    cases = [(s, _plain(d), None) for s in SHAPES + WIDE for d in DTYPES]
    cases += [(s, v, None) for s in VARIANT_SHAPES for v in VARIANTS.values()]
    return cases + [(s, VARIANTS["bf16-f32w-offset"], 1) for s in LOOP_SHAPES]


def dx_bits_differ(shape, variant, max_programs) -> bool:
    """Whether dx or dres differ in any bit between the two reductions (exact inputs)."""
    inputs = _inputs(*shape, variant, exact=True)
    dy, x, _, w, _ = inputs
    terms = np.abs(f64(dy) * (f64(w) + variant[2]) * f64(x))
    # Multiples of 2**-9 below 2**15 (every partial sum's bound) are exact in fp32.
    assert np.all(np.sum(terms, axis=-1) < 2.0**15), "row sums not exact"
    programs = max_programs or kernels.BWD_MAX_PROGRAMS
    with mock.patch.object(kernels, "BWD_MAX_PROGRAMS", programs):
        (dx, dres, _), (dx_p, dres_p, _) = _both_paths(inputs, variant)
    differ = not np.array_equal(_bits(dx), _bits(dx_p))
    if dres is not None:
        differ = differ or not np.array_equal(_bits(dres), _bits(dres_p))
    return differ


_BITS_SCRIPT = """
from tests.jax.test_bwd_columns import bit_cases, dx_bits_differ
differ = [case[:1] + case[2:] for case in bit_cases() if dx_bits_differ(*case)]
assert not differ, differ
print("OK")
"""


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="XLA's x86 ISA cap"
)
def test_dx_is_bit_equal_between_the_reductions():
    """dx (and dres) do not depend on how dweight is reduced: the row programs run the same
    code. Interpret mode runs on XLA:CPU, which decides per compiled program whether to
    contract a * b - c into an FMA and how to vectorize a sum (fp32 dx came out 1 ulp apart
    between the two launches at (1, 20) and (2, 9000), from the same HLO). So this runs in a
    process whose XLA targets AVX (no FMA instructions) on inputs whose row sums are
    exact, where every evaluation gives the same bits."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX"
    run_python(_BITS_SCRIPT, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


@pytest.mark.parametrize("shape", [(40, 130), (3, 4100)], ids=str)
def test_column_dweight_is_deterministic(shape):
    dy, x, rstd, w, _ = _inputs(*shape, _plain(jnp.float32))
    f = jax.jit(
        lambda dy, x, rstd, w: kernels.rmsnorm_bwd(
            dy, x, rstd, w, None, weight_offset=0.0, dx_dtype=x.dtype, dres_dtype=None,
            interpret=True,
        )[2]
    )  # fmt: skip
    first = _bits(f(dy, x, rstd, w))
    for _ in range(2):
        np.testing.assert_array_equal(_bits(f(dy, x, rstd, w)), first)


@pytest.mark.parametrize(
    "m,n,weight,launches",
    [
        (1024, 64, True, 1),  # at the threshold: column programs
        (1025, 64, True, 2),  # above: partials and their reduction
        (1024, 64, False, 1),  # no weight: no dweight, no column programs
        (1025, 64, False, 1),
        (8, 20000, True, 3),  # looped: dx, partials, reduction
    ],
)
def test_backward_launches(m, n, weight, launches):
    """pallas_calls of the kernels' backward (the module's own threshold), and of the public
    op's gradient (its forward adds one). Traced only."""
    dy, x, rstd, w, _ = _inputs(m, n, _plain(jnp.bfloat16))
    w = w if weight else None
    assert _launches((dy, x, rstd, w, None), _plain(x.dtype)) == launches

    def loss(x, w):
        return jnp.sum(accel_jax.rmsnorm(x, w, interpret=True).astype(jnp.float32))

    if weight:
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
    else:
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: loss(x, None)))(x)
    assert _pallas_calls(jaxpr.jaxpr) == 1 + launches


def test_column_tile_width():
    assert kernels.bwd_dw_cols(kernels.BWD_COLUMN_ROWS, 4096) == kernels.BWD_DW_COLS
    assert kernels.bwd_dw_cols(1, 4097) == 2 * kernels.BWD_DW_COLS
    assert kernels.bwd_dw_cols(kernels.BWD_COLUMN_ROWS + 1, 64) == 0
