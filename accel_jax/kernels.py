"""Pallas kernels (Triton lowering) for RMSNorm: bodies and launch shapes only.

Every kernel works on 2-D row-major arrays of shape (M, N); the ops layer flattens leading
dimensions and decides when to call these. Numerics (all in fp32):

    ss = sum(x * x);  rstd = 1 / sqrt(ss / N + eps);  xhat = x * rstd
    w = weight + weight_offset
    fp32 casting:  y = round_out(xhat * w)
    llama casting: y = round_out(round_in(xhat) * w)

Block shapes handed to Triton must be powers of two, so ragged rows and columns are masked
(masked loads read 0, which adds nothing to any sum). Up to ``SINGLE_BLOCK_MAX`` columns a
program keeps whole rows in registers; beyond that it loops over ``LOOP_BLOCK`` chunks, two
passes over the row (statistics, then output). The single-block backward walks rows wider
than ``BWD_MAX_CHUNK`` in chunks, keeping one dweight accumulator per chunk.

Backward is deterministic (no atomics), dweight summed in fp32 in a fixed order. Single
block with a weight and at most ``BWD_COLUMN_ROWS`` rows: one launch, whose programs past
the G row programs each sum one tile of dweight's columns over all rows (re-reading x and
dy, mostly from L2) and write it. Otherwise (more rows, or the looped path) a fixed number
of programs G (from the shape only) each write one fp32 row of dweight partial sums, and
``rmsnorm_dweight_reduce`` sums those rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
except ImportError as e:  # a JAX without the Pallas Triton backend: ops falls back
    pl = pltriton = None
    UNAVAILABLE = f"{type(e).__name__}: {e}"
else:
    UNAVAILABLE = None

F32 = jnp.float32

# Columns up to which a row lives in registers in one block (elements, a power of two).
SINGLE_BLOCK_MAX = 16384
# Chunk width of the looped path for wider rows.
LOOP_BLOCK = 8192
# Target elements per forward program for narrow rows (several rows per program).
FWD_TARGET_ELEMS = 4096
# Most rows one program handles at once.
MAX_ROWS_PER_BLOCK = 64
# Forward blocks up to this many elements load the weight before x, so that its latency
# overlaps x's instead of following the reduction; in wider ones the early load costs
# registers the row needs (H100: fused 4096x16384 183 -> 193 us with it). bench/NOTES.md.
FWD_EARLY_WEIGHT_MAX = 8192
# Cap on backward programs G; G = min(row blocks, cap) depends on the shape only. Rows of
# 8192+ columns keep a wide dweight accumulator per program: fewer programs run faster
# (H100 sweep in bench/NOTES.md).
BWD_MAX_PROGRAMS = 256
BWD_MAX_PROGRAMS_WIDE = 128
# Widest column chunk of the single-block backward (a wider row is walked in chunks).
BWD_MAX_CHUNK = 8192
# Up to this many rows the single-block backward sums dweight by column programs of its own
# launch (one launch instead of two), each over a (BWD_DW_ROWS, BWD_DW_COLS) tile (twice
# the columns past 4096): accel_torch's layout (H200, torch: 256x4096 12.3 -> 8.0 us cold).
BWD_COLUMN_ROWS = 1024
BWD_DW_COLS, BWD_DW_ROWS = 32, 32
# Looped-path dweight kernel: tile (rows x columns) and program cap over rows.
DW_TILE_ROWS = 8
DW_TILE_COLS = 1024
DW_LOOPED_MAX_PROGRAMS = 32


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _warps(elems: int) -> int:
    """num_warps for a program touching ``elems`` elements per block."""
    if elems >= 16384:
        return 16
    if elems >= 4096:
        return 8
    if elems >= 1024:
        return 4
    return 2 if elems >= 256 else 1


def varying_axes(arrays) -> frozenset:
    """The manual mesh axes (inside shard_map) any of arrays varies over; empty elsewhere."""
    return frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def _varying_like(out_shape, inputs):
    """out_shape's structs marked varying over the inputs' manual mesh axes (inside
    shard_map, where check_vma needs them); unchanged elsewhere."""
    varying = varying_axes(inputs)
    if not varying:
        return out_shape
    mat = jax.sharding.ManualAxisType(varying=varying)
    mark = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat)  # noqa: E731
    return [mark(s) for s in out_shape] if isinstance(out_shape, list) else mark(out_shape)


def _pallas(kernel, name: str, out_shape, grid, num_warps: int, num_stages=None, *, interpret):
    """pl.pallas_call of one kernel on the Triton backend (compiler parameters built here)."""

    def call(*inputs):
        return pl.pallas_call(
            kernel,
            out_shape=_varying_like(out_shape, inputs),
            grid=grid,
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name=name,
        )(*inputs)

    return call


@dataclasses.dataclass(frozen=True)
class RowLaunch:
    """Launch shape of a row-parallel kernel (forward or backward).

    block_n: columns per block (power of two); rows: rows per block (power of two);
    looped: whether N > block_n (chunk loop); num_warps / num_stages: Triton settings.
    """

    block_n: int
    rows: int
    looped: bool
    num_warps: int
    num_stages: int


def row_launch(m: int, n: int) -> RowLaunch:
    """Launch shape for (M, N) rows: whole rows per block up to SINGLE_BLOCK_MAX columns."""
    block = next_pow2(n)
    if block > SINGLE_BLOCK_MAX:
        return RowLaunch(LOOP_BLOCK, 1, True, _warps(LOOP_BLOCK), 2)
    rows = max(1, FWD_TARGET_ELEMS // block)
    rows = min(rows, MAX_ROWS_PER_BLOCK, next_pow2(m))
    return RowLaunch(block, rows, False, _warps(block * rows), 1)


def fwd_launch(m: int, n: int, fused: bool = False) -> RowLaunch:
    """Forward launch shape (fused: with a residual): row_launch's, except that blocks of
    4096 columns go two rows to a program with 16 warps (H100 sweep in bench/NOTES.md:
    2048x4096 cold 13.7 -> 13.0 us), but for a plain forward of fewer columns, one row
    with 4 warps (H200, 4096x3072: 16.5 -> 14.9 us cold)."""
    launch = row_launch(m, n)
    if launch.block_n == 4096 and not launch.looped and m > 1:
        if n < 4096 and not fused:
            return dataclasses.replace(launch, rows=1, num_warps=4)
        return dataclasses.replace(launch, rows=2, num_warps=16)
    return launch


def _mask(row_mask, col_mask):
    """Combine optional (R,) and (C,) masks into an (R, C) mask (None when both are None)."""
    if row_mask is None and col_mask is None:
        return None
    if row_mask is None:
        return col_mask[None, :]
    if col_mask is None:
        return row_mask[:, None]
    return row_mask[:, None] & col_mask[None, :]


def _load(ref, mask):
    """Load a block; masked-out elements read as 0 (interpret mode would pad with NaN)."""
    if mask is None:
        return pltriton.load(ref)
    return pltriton.load(ref, mask=mask, other=0)


def _store(ref, value, mask):
    pltriton.store(ref, value.astype(ref.dtype), mask=mask)


def _row_ids(r0, rows: int, m: int, always_full: bool):
    """Row indices of a block and their mask (None when every row is in range)."""
    ids = r0 + jnp.arange(rows, dtype=jnp.int32)
    return None if always_full else ids < m


def _col_mask(c0, cols: int, n: int):
    """Column mask of a chunk starting at c0 (None when the chunk can never run past n)."""
    if n % cols == 0:
        return None
    return (c0 + jnp.arange(cols, dtype=jnp.int32)) < n


def _ds(start, size: int):
    """pl.ds with an int32 start. Under jax_enable_x64 Python ints and loop indices are
    int64, and one index mixing them with int32 program ids fails in interpret mode."""
    return pl.ds(lax.convert_element_type(start, jnp.int32), size)


def _weight_chunk(w_ref, c0, cols, col_mask, weight_offset):
    w = _load(w_ref.at[_ds(c0, cols)], col_mask).astype(F32)
    if weight_offset:
        w = w + weight_offset
    return w[None, :]


def _normalize(x, rstd, w, llama, round_dtype):
    """y (fp32, before the output rounding) from fp32 x, (R,) rstd and optional (1, C) w."""
    r = rstd[:, None]
    if llama:
        xhat = (x * r).astype(round_dtype).astype(F32)
        return xhat if w is None else xhat * w
    # x * (rstd * w): one rounding into fp32's subnormal range, where (x * rstd) * w had two.
    return x * r if w is None else x * (r * w)


# ----------------------------------------------------------------------------- forward


def fwd_refs(refs, has_residual, has_weight, store_h, store_rstd):
    """The forward kernels' refs in rmsnorm_fwd's order, None where absent:
    (x, residual, w) inputs, then (y, h, rstd) outputs."""
    it = iter(refs)
    x_ref = next(it)
    r_ref = next(it) if has_residual else None
    w_ref = next(it) if has_weight else None
    y_ref = next(it)
    h_ref = next(it) if store_h else None
    rstd_ref = next(it) if store_rstd else None
    return x_ref, r_ref, w_ref, y_ref, h_ref, rstd_ref


def _fwd_kernel(
    *refs,
    m,
    n,
    launch: RowLaunch,
    eps,
    weight_offset,
    llama,
    round_dtype,
    has_residual,
    has_weight,
    store_h,
    store_rstd,
):
    x_ref, r_ref, w_ref, y_ref, h_ref, rstd_ref = fwd_refs(
        refs, has_residual, has_weight, store_h, store_rstd
    )

    rows, cols = launch.rows, launch.block_n
    r0 = pl.program_id(0) * rows
    row_mask = _row_ids(r0, rows, m, m % rows == 0)

    def load_input(c0, col_mask, write_h):
        """fp32 input chunk: x, or h = round(x + residual) (stored once when asked)."""
        mask = _mask(row_mask, col_mask)
        idx = (_ds(r0, rows), _ds(c0, cols))
        x = _load(x_ref.at[idx], mask).astype(F32)
        if not has_residual:
            return x
        h = (x + _load(r_ref.at[idx], mask).astype(F32)).astype(round_dtype)
        if write_h and store_h:
            _store(h_ref.at[idx], h, mask)
        return h.astype(F32)

    def load_weight(c0, col_mask):
        return _weight_chunk(w_ref, c0, cols, col_mask, weight_offset) if has_weight else None

    def write_y(c0, col_mask, x, rstd, w):
        y = _normalize(x, rstd, w, llama, round_dtype)
        _store(y_ref.at[_ds(r0, rows), _ds(c0, cols)], y, _mask(row_mask, col_mask))

    if not launch.looped:
        col_mask = _col_mask(0, cols, n)
        early = rows * cols <= FWD_EARLY_WEIGHT_MAX
        w = load_weight(0, col_mask) if early else None
        x = load_input(0, col_mask, True)
        rstd = 1.0 / jnp.sqrt(jnp.sum(x * x, axis=1) / n + eps)
        if not early:
            w = load_weight(0, col_mask)
        write_y(0, col_mask, x, rstd, w)
    else:
        n_chunks = pl.cdiv(n, cols)

        def ss_body(c, acc):
            c0 = c * cols
            x = load_input(c0, _col_mask(c0, cols, n), True)
            return acc + x * x

        acc = lax.fori_loop(0, n_chunks, ss_body, jnp.zeros((rows, cols), F32))
        rstd = 1.0 / jnp.sqrt(jnp.sum(acc, axis=1) / n + eps)

        # Second pass recomputes h from x and residual rather than reading back h_ref:
        # the same rounding gives the same bits, and no store-then-load ordering is needed.
        @pl.loop(0, n_chunks)
        def _(c):
            c0 = c * cols
            col_mask = _col_mask(c0, cols, n)
            w = load_weight(c0, col_mask)
            write_y(c0, col_mask, load_input(c0, col_mask, False), rstd, w)

    if store_rstd:
        _store(rstd_ref.at[_ds(r0, rows)], rstd, row_mask)


def fwd_out_shape(m: int, n: int, out_dtype, round_dtype, store_h: bool, store_rstd: bool):
    """A forward kernel's outputs: y (M, N), then h (M, N) and rstd (M,) fp32 where stored."""
    out_shape = [jax.ShapeDtypeStruct((m, n), out_dtype)]
    if store_h:
        out_shape.append(jax.ShapeDtypeStruct((m, n), round_dtype))
    if store_rstd:
        out_shape.append(jax.ShapeDtypeStruct((m,), F32))
    return out_shape


def fwd_outputs(outs, store_h: bool, store_rstd: bool):
    """(y, h or None, rstd or None) from the outputs of fwd_out_shape."""
    outs = list(outs)
    y = outs.pop(0)
    h = outs.pop(0) if store_h else None
    rstd = outs.pop(0) if store_rstd else None
    return y, h, rstd


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
    interpret: bool,
):
    """Forward kernel, plain or fused residual-add.

    x: (M, N) fp32/fp16/bf16. residual: None or (M, N) any float dtype. weight: None or (N,).
    round_dtype: dtype of h (fused) and of the llama intermediate rounding.
    Returns (y (M, N) out_dtype, h (M, N) round_dtype or None, rstd (M,) fp32 or None).
    """
    m, n = x.shape
    has_residual = residual is not None
    launch = fwd_launch(m, n, has_residual)
    has_weight = weight is not None
    store_h = store_h and has_residual
    out_shape = fwd_out_shape(m, n, out_dtype, round_dtype, store_h, store_rstd)
    kernel = functools.partial(
        _fwd_kernel,
        m=m,
        n=n,
        launch=launch,
        eps=eps,
        weight_offset=weight_offset,
        llama=llama,
        round_dtype=round_dtype,
        has_residual=has_residual,
        has_weight=has_weight,
        store_h=store_h,
        store_rstd=store_rstd,
    )
    inputs = [a for a in (x, residual, weight) if a is not None]
    name = "rmsnorm_residual_fwd" if has_residual else "rmsnorm_fwd"
    grid = (pl.cdiv(m, launch.rows),)
    outs = _pallas(
        kernel, name, out_shape, grid, launch.num_warps, launch.num_stages, interpret=interpret
    )(*inputs)
    return fwd_outputs(outs, store_h, store_rstd)


# ---------------------------------------------------------------------------- backward


def bwd_programs(m: int, rows: int, block_n: int = 0) -> int:
    """G, the number of backward programs (and dweight partial rows): shape only."""
    cap = BWD_MAX_PROGRAMS_WIDE if block_n >= 8192 else BWD_MAX_PROGRAMS
    return max(1, min(pl.cdiv(m, rows), cap))


def bwd_num_warps(launch: RowLaunch, columns: bool = False) -> int:
    """Warps of the single-block backward (H100 sweeps: 16 from 8192 columns); with column
    programs (columns) at 4096 columns, 4 (H200, 1024x4096: 19.1 -> 16.4 us cold, 256x4096
    unchanged)."""
    if launch.block_n * launch.rows >= 8192:
        return 16
    if columns and launch.block_n * launch.rows == 4096:
        return 4
    return launch.num_warps


def bwd_chunks(launch: RowLaunch) -> int:
    """Column chunks of a single-block backward row: rows wider than BWD_MAX_CHUNK are
    walked in chunks (a whole row's x, dy, w and dweight at once spill registers)."""
    return max(1, launch.block_n // BWD_MAX_CHUNK)


def bwd_dw_cols(m: int, n: int) -> int:
    """Columns per dweight column program of the single-block backward with a weight; 0
    above BWD_COLUMN_ROWS rows (per-program partials and rmsnorm_dweight_reduce instead)."""
    if m > BWD_COLUMN_ROWS:
        return 0
    return BWD_DW_COLS if n <= 4096 else 2 * BWD_DW_COLS


def bwd_refs(refs, has_weight, has_dh, store_dres, store_dw):
    """The backward kernels' refs in rmsnorm_bwd's order, None where absent:
    (dy, x, rstd, w, dh) inputs, then (dx, dres, dweight or its partials) outputs."""
    it = iter(refs)
    dy_ref, x_ref, rstd_ref = next(it), next(it), next(it)
    w_ref = next(it) if has_weight else None
    dh_ref = next(it) if has_dh else None
    dx_ref = next(it)
    dres_ref = next(it) if store_dres else None
    dwp_ref = next(it) if store_dw else None
    return dy_ref, x_ref, rstd_ref, w_ref, dh_ref, dx_ref, dres_ref, dwp_ref


def _bwd_kernel(*refs, m, n, programs, has_weight, has_dh, store_dres, dw_cols, **rows_args):
    """Single-block backward: programs 0..G-1 take the rows (_bwd_rows). dw_cols = 0: each
    also sums its rows' dweight into its row of the (G, N) fp32 partials (the last output).
    dw_cols > 0: programs G, G+1, ... instead each sum dweight for dw_cols columns over all
    rows (_bwd_dw_columns) into the last output, dweight (N,) itself."""
    refs = bwd_refs(refs, has_weight, has_dh, store_dres, has_weight)
    pid = pl.program_id(0)
    rows = functools.partial(
        _bwd_rows, refs, pid, m=m, n=n, programs=programs, has_weight=has_weight,
        has_dh=has_dh, store_dres=store_dres, store_dw=has_weight and not dw_cols, **rows_args,
    )  # fmt: skip
    if not dw_cols:
        rows()
        return
    dy_ref, x_ref, rstd_ref, *_, dw_ref = refs
    columns = functools.partial(
        _bwd_dw_columns, dy_ref, x_ref, rstd_ref, dw_ref, pid - programs, m=m, n=n, cols=dw_cols
    )
    lax.cond(pid < programs, rows, columns)


def _bwd_rows(
    refs,
    pid,
    *,
    m,
    n,
    launch: RowLaunch,
    programs,
    weight_offset,
    has_weight,
    has_dh,
    store_dres,
    store_dw,
):
    """Row program pid of the single-block backward: the G programs stride over row blocks,
    dweight (store_dw) kept in registers and written to row pid of the partials.

    One chunk: the next block's x and dy are loaded before this block's reduction (a loop
    carry; a block's reduction sits between its loads and stores, so little else would be
    in flight). Several chunks (rows = 1): every chunk's x and dy loaded, one reduction of
    the chunks' summed g * x, then dx chunk by chunk from reloaded x and dy (mostly L1/L2
    hits), one dweight accumulator per chunk.
    """
    dy_ref, x_ref, rstd_ref, w_ref, dh_ref, dx_ref, dres_ref, dwp_ref = refs

    chunks = bwd_chunks(launch)
    rows, cols = launch.rows, launch.block_n // chunks
    n_blocks = pl.cdiv(m, rows)
    steps = pl.cdiv(n_blocks, programs)
    always_full = m % rows == 0 and n_blocks % programs == 0
    # Chunk starts are traced values (Triton folds them back to constants): Pallas rejects
    # a static slice that runs past the array even where the mask covers it (the last
    # chunk of a ragged row).
    starts = [k * cols + 0 * pid for k in range(chunks)]
    col_masks = [_col_mask(k * cols, cols, n) for k in range(chunks)]
    # One chunk: the weight stays in registers; several: each chunk's is reloaded (L1).
    w_whole = None
    if has_weight and chunks == 1:
        w_whole = _weight_chunk(w_ref, 0, cols, col_masks[0], weight_offset)

    def weight(k):
        if not has_weight or chunks == 1:
            return w_whole
        return _weight_chunk(w_ref, starts[k], cols, col_masks[k], weight_offset)

    def block(r0, k, check_rows=not always_full):
        """Index, row mask and element mask of chunk k of the row block at r0."""
        row_mask = _row_ids(r0, rows, m, not check_rows)
        return (_ds(r0, rows), _ds(starts[k], cols)), row_mask, _mask(row_mask, col_masks[k])

    def load_x_dy(r0, k, check_rows=not always_full):
        idx, _, mask = block(r0, k, check_rows)
        return _load(x_ref.at[idx], mask), _load(dy_ref.at[idx], mask)

    def g_x(k, x, dy):
        """g * x over chunk k of a block, g = dy * w (fp32); the chunks' products are
        added before one reduction."""
        w = weight(k)
        g = dy.astype(F32) if w is None else dy.astype(F32) * w
        return g * x.astype(F32)

    def store_grads(r0, k, x, dy, rstd, mean_gx):
        """Store dx (and dres) of chunk k; return its dweight contribution dy * xhat."""
        idx, _, mask = block(r0, k)
        xhat = x.astype(F32) * rstd[:, None]
        dy = dy.astype(F32)
        w = weight(k)
        g = dy if w is None else dy * w
        dx = rstd[:, None] * (g - xhat * mean_gx[:, None])
        if has_dh:
            dx = dx + _load(dh_ref.at[idx], mask).astype(F32)
        _store(dx_ref.at[idx], dx, mask)
        if store_dres:
            _store(dres_ref.at[idx], dx, mask)
        return dy * xhat

    def load_rstd(r0):
        return _load(rstd_ref.at[_ds(r0, rows)], block(r0, 0)[1]).astype(F32)

    def start(i):
        return (pid + i * programs) * rows

    zeros = tuple(jnp.zeros((rows, cols), F32) for _ in range(chunks))
    if chunks == 1:

        def body(i, carry):
            acc, x, dy = carry
            r0 = start(i)
            # The last step prefetches rows past m: masked, they read as 0.
            x_next, dy_next = load_x_dy(start(i + 1), 0, check_rows=True)
            rstd = load_rstd(r0)
            mean_gx = jnp.sum(g_x(0, x, dy), axis=1) * rstd / n
            dw = store_grads(r0, 0, x, dy, rstd, mean_gx)
            return (acc[0] + dw if store_dw else acc[0],), x_next, dy_next

        acc = lax.fori_loop(0, steps, body, (zeros, *load_x_dy(start(0), 0)))[0]
    else:

        def body(i, acc):
            r0 = start(i)
            rstd = load_rstd(r0)
            # Every chunk's loads go out before the one reduction (which waits on them all).
            loaded = [load_x_dy(r0, k) for k in range(chunks)]
            gx = g_x(0, *loaded[0])
            for k in range(1, chunks):
                gx = gx + g_x(k, *loaded[k])
            mean_gx = jnp.sum(gx, axis=1) * rstd / n
            dws = [store_grads(r0, k, *load_x_dy(r0, k), rstd, mean_gx) for k in range(chunks)]
            return tuple(a + dw for a, dw in zip(acc, dws, strict=True)) if store_dw else acc

        acc = lax.fori_loop(0, steps, body, zeros)
    if store_dw:
        for k in range(chunks):
            _store(
                dwp_ref.at[_ds(pid, 1), _ds(starts[k], cols)],
                jnp.sum(acc[k], axis=0)[None, :],
                _mask(None, col_masks[k]),
            )


def _bwd_dx_looped_kernel(
    *refs, n, launch: RowLaunch, weight_offset, has_weight, has_dh, store_dres
):
    """Looped backward dx for wide rows: one row per program, two passes over chunks."""
    dy_ref, x_ref, rstd_ref, w_ref, dh_ref, dx_ref, dres_ref, _ = bwd_refs(
        refs, has_weight, has_dh, store_dres, False
    )

    cols = launch.block_n
    r0 = pl.program_id(0)
    rstd = _load(rstd_ref.at[_ds(r0, 1)], None).astype(F32)
    n_chunks = pl.cdiv(n, cols)

    def chunk(c):
        c0 = c * cols
        col_mask = _col_mask(c0, cols, n)
        mask = _mask(None, col_mask)
        idx = (_ds(r0, 1), _ds(c0, cols))
        xhat = _load(x_ref.at[idx], mask).astype(F32) * rstd[:, None]
        dy = _load(dy_ref.at[idx], mask).astype(F32)
        if has_weight:
            dy = dy * _weight_chunk(w_ref, c0, cols, col_mask, weight_offset)
        return idx, mask, xhat, dy

    def dot_body(c, acc):
        _, _, xhat, g = chunk(c)
        return acc + g * xhat

    acc = lax.fori_loop(0, n_chunks, dot_body, jnp.zeros((1, cols), F32))
    mean_gx = jnp.sum(acc, axis=1) / n

    @pl.loop(0, n_chunks)
    def _(c):
        idx, mask, xhat, g = chunk(c)
        dx = rstd[:, None] * (g - xhat * mean_gx[:, None])
        if has_dh:
            dx = dx + _load(dh_ref.at[idx], mask).astype(F32)
        _store(dx_ref.at[idx], dx, mask)
        if store_dres:
            _store(dres_ref.at[idx], dx, mask)


def _dw_tile_sum(dy_ref, x_ref, rstd_ref, c0, first, stride, *, m, n, rows, cols):
    """(cols,) fp32 sum of dy * (x * rstd) over row blocks first, first + stride, ... (of
    `rows` rows) of the columns from c0, always in that order; and the column mask."""
    col_mask = _col_mask(c0, cols, n)
    n_blocks = pl.cdiv(m, rows)
    steps = pl.cdiv(n_blocks, stride)
    always_full = m % rows == 0 and n_blocks % stride == 0

    def body(i, acc):
        r0 = (first + i * stride) * rows
        row_mask = _row_ids(r0, rows, m, always_full)
        mask = _mask(row_mask, col_mask)
        idx = (_ds(r0, rows), _ds(c0, cols))
        x = _load(x_ref.at[idx], mask).astype(F32)
        dy = _load(dy_ref.at[idx], mask).astype(F32)
        rstd = _load(rstd_ref.at[_ds(r0, rows)], row_mask).astype(F32)
        return acc + dy * (x * rstd[:, None])

    acc = lax.fori_loop(0, steps, body, jnp.zeros((rows, cols), F32))
    return jnp.sum(acc, axis=0), col_mask


def _bwd_dw_columns(dy_ref, x_ref, rstd_ref, dw_ref, block, *, m, n, cols):
    """Column program `block` of the single-block backward: dweight's columns from
    block * cols (cols of them) summed over all rows, BWD_DW_ROWS at a time, rounded once
    to dweight's dtype."""
    c0 = block * cols
    dw, col_mask = _dw_tile_sum(
        dy_ref, x_ref, rstd_ref, c0, 0, 1, m=m, n=n, rows=BWD_DW_ROWS, cols=cols
    )
    _store(dw_ref.at[_ds(c0, cols)], dw, col_mask)


def _bwd_dw_looped_kernel(dy_ref, x_ref, rstd_ref, dwp_ref, *, m, n, programs):
    """Looped-path dweight partials: program (g, j) sums rows g, g+G, ... of column tile j."""
    cols = DW_TILE_COLS
    pid = pl.program_id(0)
    c0 = pl.program_id(1) * cols
    dw, col_mask = _dw_tile_sum(
        dy_ref, x_ref, rstd_ref, c0, pid, programs, m=m, n=n, rows=DW_TILE_ROWS, cols=cols
    )
    _store(dwp_ref.at[_ds(pid, 1), _ds(c0, cols)], dw[None, :], _mask(None, col_mask))


def _dw_reduce_kernel(p_ref, dw_ref, *, g, n, block_g, block_n):
    """dweight[j] = sum over g of partial[g, j], always in the same order."""
    c0 = pl.program_id(0) * block_n
    col_mask = _col_mask(c0, block_n, n)
    always_full = g % block_g == 0

    def body(i, acc):
        r0 = i * block_g
        mask = _mask(_row_ids(r0, block_g, g, always_full), col_mask)
        return acc + _load(p_ref.at[_ds(r0, block_g), _ds(c0, block_n)], mask)

    acc = lax.fori_loop(0, pl.cdiv(g, block_g), body, jnp.zeros((block_g, block_n), F32))
    _store(dw_ref.at[_ds(c0, block_n)], jnp.sum(acc, axis=0), col_mask)


def rmsnorm_dweight_reduce(partial, out_dtype, *, interpret: bool):
    """Deterministic column sum of (G, N) fp32 partials -> (N,) in out_dtype."""
    g, n = partial.shape
    block_g = min(next_pow2(g), 64)
    # Narrow column tiles so that even N = 4096 spreads over ~128 programs.
    block_n = min(max(next_pow2(pl.cdiv(n, 128)), 16), 256)
    kernel = functools.partial(_dw_reduce_kernel, g=g, n=n, block_g=block_g, block_n=block_n)
    out_shape = jax.ShapeDtypeStruct((n,), out_dtype)
    grid = (pl.cdiv(n, block_n),)
    return _pallas(
        kernel, "rmsnorm_dweight_reduce", out_shape, grid, _warps(block_g * block_n),
        interpret=interpret,
    )(partial)  # fmt: skip


def rmsnorm_bwd(
    dy,
    x,
    rstd,
    weight,
    dh,
    *,
    weight_offset: float,
    dx_dtype,
    dres_dtype,
    interpret: bool,
):
    """Backward kernels.

    Single block (N <= SINGLE_BLOCK_MAX) with a weight and M <= BWD_COLUMN_ROWS: one launch,
    dweight summed by its column programs. Single block with more rows: the launch writes
    (G, N) fp32 partials and rmsnorm_dweight_reduce sums them. Looped (wider rows): dx by
    one kernel, partials by a second, their reduction a third. No weight: the dx launch only.

    dy: (M, N) cotangent of y. x: (M, N) the normalized input (x, or h when fused).
    rstd: (M,) fp32 saved by the forward. weight: None or (N,). dh: None or (M, N) cotangent
    of h (fused), added to dx. dx_dtype: dtype of dx; dres_dtype: None or a second dtype in
    which the same gradient is also written (the residual's, when it differs from x's).
    Returns (dx, dres or None, dweight (N,) in weight's dtype or None).
    """
    m, n = x.shape
    launch = row_launch(m, n)
    has_weight = weight is not None
    has_dh = dh is not None
    store_dres = dres_dtype is not None
    grad_shapes = [jax.ShapeDtypeStruct((m, n), dx_dtype)]
    if store_dres:
        grad_shapes.append(jax.ShapeDtypeStruct((m, n), dres_dtype))
    inputs = [a for a in (dy, x, rstd, weight, dh) if a is not None]
    flags = dict(
        weight_offset=weight_offset, has_weight=has_weight, has_dh=has_dh, store_dres=store_dres
    )

    dweight = partial = None
    if not launch.looped:
        programs = bwd_programs(m, launch.rows, launch.block_n)
        dw_cols = bwd_dw_cols(m, n) if has_weight else 0
        out_shape = list(grad_shapes)
        if dw_cols:
            out_shape.append(jax.ShapeDtypeStruct((n,), weight.dtype))
        elif has_weight:
            out_shape.append(jax.ShapeDtypeStruct((programs, n), F32))
        kernel = functools.partial(
            _bwd_kernel, m=m, n=n, launch=launch, programs=programs, dw_cols=dw_cols, **flags
        )
        grid = (programs + (pl.cdiv(n, dw_cols) if dw_cols else 0),)
        outs = list(
            _pallas(
                kernel, "rmsnorm_bwd", out_shape, grid, bwd_num_warps(launch, dw_cols > 0), 1,
                interpret=interpret,
            )(*inputs)
        )  # fmt: skip
        if dw_cols:
            dweight = outs.pop()
        elif has_weight:
            partial = outs.pop()
    else:
        kernel = functools.partial(_bwd_dx_looped_kernel, n=n, launch=launch, **flags)
        outs = list(
            _pallas(
                kernel, "rmsnorm_bwd_dx", grad_shapes, (m,), launch.num_warps, launch.num_stages,
                interpret=interpret,
            )(*inputs)
        )  # fmt: skip
        if has_weight:
            programs = max(1, min(pl.cdiv(m, DW_TILE_ROWS), DW_LOOPED_MAX_PROGRAMS))
            partial = _pallas(
                functools.partial(_bwd_dw_looped_kernel, m=m, n=n, programs=programs),
                "rmsnorm_bwd_dweight",
                jax.ShapeDtypeStruct((programs, n), F32),
                (programs, pl.cdiv(n, DW_TILE_COLS)),
                _warps(DW_TILE_ROWS * DW_TILE_COLS),
                interpret=interpret,
            )(dy, x, rstd)
    dx = outs[0]
    dres = outs[1] if store_dres else None
    if partial is not None:
        dweight = rmsnorm_dweight_reduce(partial, weight.dtype, interpret=interpret)
    return dx, dres, dweight


__all__ = [
    "UNAVAILABLE",
    "RowLaunch",
    "bwd_dw_cols",
    "bwd_programs",
    "fwd_launch",
    "fwd_out_shape",
    "fwd_outputs",
    "fwd_refs",
    "next_pow2",
    "rmsnorm_bwd",
    "rmsnorm_dweight_reduce",
    "rmsnorm_fwd",
    "row_launch",
    "varying_axes",
]
