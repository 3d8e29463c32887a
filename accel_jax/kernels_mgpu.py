"""Pallas Mosaic GPU kernels (Hopper and newer) for the RMSNorm forward, plain and fused.

The same numerics as ``accel_jax.kernels`` (all in fp32):

    ss = sum(x * x);  rstd = 1 / sqrt(ss / N + eps);  xhat = x * rstd
    fp32 casting:  y = round_out(xhat * w)
    llama casting: y = round_out(round_in(xhat) * w)

One program is one warpgroup (128 threads) and normalizes R whole rows, read from global
memory straight into registers as 16-byte vectors and written back the same way: no shared
memory staging, no masks. The rows of a program are split over its four warps (``R = 4``: a
warp per row, the row sums stay inside a warp; ``R = 2``: two warps per row, summed across
warps by Mosaic GPU's reduction through shared memory). The last program starts at row
``M - R`` instead of past the end, so it recomputes (and rewrites with the same bits) a few
rows of its neighbour rather than reading out of bounds.

``supported`` says which shapes these kernels serve: N a multiple of the 32-lane vector row
(256 columns for 16-bit inputs) and at most ``MAX_COLS``, at least 4 rows. Everything else
goes to the Triton-lowered kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

try:
    from jax.experimental import pallas as pl
    from jax.experimental.mosaic.gpu import fragmented_array as _fa
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as e:  # a JAX without Pallas Mosaic GPU: ops keeps the Triton kernels
    pl = plgpu = _fa = None
    UNAVAILABLE = f"{type(e).__name__}: {e}"
else:
    UNAVAILABLE = None

from accel_jax.kernels import fwd_out_shape, fwd_outputs  # noqa: E402

F32 = jnp.float32
# Rows per program are chosen so that a thread holds at most this many fp32 row elements
# (R * N / 128), which keeps a row's values in registers.
ELEMS_PER_THREAD = 128
# Two rows at least: a program's one-element rstd store would need the scalar path, which
# Mosaic GPU (JAX 0.10) offers only for shared memory.
MAX_COLS = 64 * ELEMS_PER_THREAD
# JAX 0.11 moved ``load``'s index into the ref (``ref.at[...]``) and warns on the old form.
_INDEX_ARG = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11)


def vector_len(*dtypes) -> int:
    """Elements per 16-byte access of the narrowest dtype (wider dtypes take 32 bytes)."""
    return 16 // min(jnp.dtype(d).itemsize for d in dtypes)


def rows_per_program(n: int) -> int:
    """R (4, 2 or 1): as many rows as keep a thread's share within ELEMS_PER_THREAD."""
    rows = 4
    while rows > 1 and rows * n > 128 * ELEMS_PER_THREAD:
        rows //= 2
    return rows


def supported(m: int, n: int, *dtypes) -> bool:
    """Whether these kernels serve an (M, N) forward with inputs/outputs of ``dtypes``."""
    if UNAVAILABLE is not None:
        return False
    vec = vector_len(*dtypes)
    return n % (32 * vec) == 0 and n <= MAX_COLS and m >= rows_per_program(n)


def _rows_layout(rows: int, n: int, vec: int):
    """(rows, N) over one warpgroup: 4 // rows warps per row, 32 lanes of vec elements."""
    per_row = 4 // rows
    tiles = ((rows, per_row * 32 * vec), (32 * vec,), (vec,))
    if per_row == 1:
        tiles = ((rows, 32 * vec), (vec,))
    layout = _fa.TiledLayout(
        _fa.Tiling(tiles),
        warp_dims=(-4, -3) if per_row > 1 else (-3,),
        lane_dims=(-2,),
        vector_dim=-1,
        _check_canonical=False,
    ).canonicalize()
    return layout


def _weight_layout(rows: int, n: int, vec: int):
    """(N,) laid out as one row of the rows layout, the same on every warp of that row."""
    return _rows_layout(rows, n, vec).reduce((0,))


def _as_pallas_layout(layout):
    return plgpu.Layout.TILED(
        layout.tiling,
        warp_dims=layout.warp_dims,
        lane_dims=layout.lane_dims,
        vector_dim=layout.vector_dim,
    )


def _load(ref, layout):
    layout = _as_pallas_layout(layout)
    if _INDEX_ARG:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _named(kernel, name: str):
    """kernel under a function name (Mosaic GPU names the kernel after it)."""

    def body(*refs):
        kernel(*refs)

    body.__name__ = body.__qualname__ = name
    return body


def _fwd_kernel(
    *refs,
    m,
    n,
    rows,
    vec,
    eps,
    weight_offset,
    llama,
    round_dtype,
    has_residual,
    has_weight,
    store_h,
    store_rstd,
):
    refs = list(refs)
    x_ref = refs.pop(0)
    res_ref = refs.pop(0) if has_residual else None
    w_ref = refs.pop(0) if has_weight else None
    y_ref = refs.pop(0)
    h_ref = refs.pop(0) if store_h else None
    rstd_ref = refs.pop(0) if store_rstd else None

    layout = _rows_layout(rows, n, vec)
    at = pl.ds(jnp.minimum(lax.axis_index("rows") * rows, m - rows), rows)
    x = _load(x_ref.at[at], layout)
    if has_residual:
        h = (x.astype(F32) + _load(res_ref.at[at], layout).astype(F32)).astype(round_dtype)
        if store_h:
            h_ref[at] = h
        x = h
    x = x.astype(F32)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / n + eps)
    if store_rstd:
        rstd_ref[at] = rstd
    r = plgpu.layout_cast(lax.broadcast_in_dim(rstd, (rows, n), (0,)), _as_pallas_layout(layout))
    if has_weight:
        w = _load(w_ref, _weight_layout(rows, n, vec)).astype(F32)
        if weight_offset:
            w = w + weight_offset
        w = plgpu.layout_cast(lax.broadcast_in_dim(w, (rows, n), (1,)), _as_pallas_layout(layout))
        if llama:
            y = (x * r).astype(round_dtype).astype(F32) * w
        else:
            y = x * (r * w)
    else:
        y = x * r
    y_ref[at] = y.astype(y_ref.dtype)


def rmsnorm_fwd(
    x,
    residual,
    weight,
    *,
    eps: float,
    weight_offset: float,
    llama: bool,
    out_dtype,
    round_dtype,
    store_h: bool,
    store_rstd: bool,
):
    """Forward kernel, plain or fused residual-add (the signature of kernels.rmsnorm_fwd).

    x: (M, N) fp32/fp16/bf16 with ``supported(M, N, ...)``. residual: None or (M, N).
    weight: None or (N,). Returns (y (M, N) out_dtype, h (M, N) round_dtype or None,
    rstd (M,) fp32 or None).
    """
    m, n = x.shape
    has_residual = residual is not None
    store_h = store_h and has_residual
    inputs = [a for a in (x, residual, weight) if a is not None]
    dtypes = [a.dtype for a in inputs] + [out_dtype] + ([round_dtype] if has_residual else [])
    if not supported(m, n, *dtypes):
        raise ValueError(f"the Mosaic GPU forward does not serve {(m, n)} with dtypes {dtypes}")
    rows = rows_per_program(n)
    out_shape = fwd_out_shape(m, n, out_dtype, round_dtype, store_h, store_rstd)
    kernel = functools.partial(
        _fwd_kernel,
        m=m,
        n=n,
        rows=rows,
        vec=vector_len(*dtypes),
        eps=eps,
        weight_offset=weight_offset,
        llama=llama,
        round_dtype=round_dtype,
        has_residual=has_residual,
        has_weight=weight is not None,
        store_h=store_h,
        store_rstd=store_rstd,
    )
    body = _named(kernel, "rmsnorm_residual_fwd_mgpu" if has_residual else "rmsnorm_fwd_mgpu")
    outs = plgpu.kernel(
        body,
        out_type=out_shape,
        grid=(pl.cdiv(m, rows),),
        grid_names=("rows",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane,
            # No barrier before each store: no thread reads memory it or another writes.
            unsafe_no_auto_barriers=True,
        ),
    )(*inputs)
    return fwd_outputs(outs, store_h, store_rstd)


__all__ = ["MAX_COLS", "UNAVAILABLE", "rmsnorm_fwd", "rows_per_program", "supported"]
