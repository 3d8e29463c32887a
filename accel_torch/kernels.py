"""Triton kernels for RMSNorm and fused residual-add RMSNorm, and their launch shapes.

Every kernel works on a 2-D view (M rows, N columns) whose last dimension is contiguous;
rows may be strided. Statistics and arithmetic are fp32; each output is rounded once.

Layouts of a row:
  * one block (forward: N <= MAX_BLOCK_N; backward: N <= BWD_MAX_BLOCK_N): the row is
    loaded once into registers (forward: narrow rows several to a program, ROWS);
  * two blocks (backward only, BWD_MAX_BLOCK_N < N <= 2 * BWD_MAX_BLOCK_N): as looped, but
    each half keeps its own dweight accumulator in registers;
  * looped (wider rows): the row is walked in chunks of BLOCK_N, twice (statistics, then
    output); the second pass mostly hits L1/L2.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_BLOCK_N = 16384  # largest row kept whole in registers
LOOP_BLOCK_N = 8192  # chunk of the looped path
BWD_MAX_BLOCK_N = 8192  # widest backward block (a wider one spills registers)
BWD_COLUMN_ROWS = 1024  # up to this many rows, the backward sums dweight by column programs
BWD_DW_COLS, BWD_DW_ROWS = 32, 32  # their tile (twice the columns past 4096)
FWD_MIN_ELEMS = 1024  # narrower rows go several to a forward program


@triton.jit
def _rstd(sum_sq, N, eps):
    # IEEE sqrt and division: the same rstd bits as the float32 reference math.
    return tl.div_rn(1.0, tl.sqrt_rn(sum_sq / N + eps))


@triton.jit
def _round(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round fp32 x to dtype, to nearest even.

    SOFT_BF16 rounds to bfloat16 with integer arithmetic: Triton's CPU interpreter truncates
    fp32 -> bf16 conversions (and mishandles subnormals), so CI would otherwise test other
    numerics than the GPU runs.
    """
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, bits >> 16, rounded)  # NaN: keep it NaN, not rounded to inf
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _f32(x, SOFT_BF16: tl.constexpr):
    """x as fp32. SOFT_BF16 widens bfloat16 by its bits: Triton's interpreter mishandles
    bf16 subnormals; on the GPU this is the plain conversion."""
    if SOFT_BF16 and x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _fwd_part_load(
    X, R, W, H, rows, row_mask, stride_x, stride_r, stride_h, off, N, weight_offset,
    PART: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    EARLY_WEIGHT: tl.constexpr, SOFT_BF16: tl.constexpr,
):  # fmt: skip
    """Columns [off, off + PART) of the given rows: x in fp32 (the fused op: h = round(x + r),
    stored, in fp32), and the weight of those columns when EARLY_WEIGHT (else 0)."""
    cols = off + tl.arange(0, PART)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    w = 0.0
    if HAS_WEIGHT and EARLY_WEIGHT:
        w = _f32(tl.load(W + cols, mask=col_mask, other=0.0), SOFT_BF16) + weight_offset
    x = _f32(tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0), SOFT_BF16)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        h = _round(x + _f32(r, SOFT_BF16), H.dtype.element_ty, SOFT_BF16)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = _f32(h, SOFT_BF16)
    return x, w


@triton.jit
def _fwd_part_store(
    W, Y, NORM, x, w, rstd, rows, row_mask, stride_y, off, N, weight_offset,
    PART: tl.constexpr, HAS_WEIGHT: tl.constexpr, LLAMA: tl.constexpr,
    EARLY_WEIGHT: tl.constexpr, SOFT_BF16: tl.constexpr,
):  # fmt: skip
    """Store y of columns [off, off + PART) of the given rows; x, w from _fwd_part_load.
    NORM: the normalized tensor (x, or the fused op's h), whose dtype "llama" rounds to."""
    cols = off + tl.arange(0, PART)
    col_mask = cols < N
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        if not EARLY_WEIGHT:
            w = _f32(tl.load(W + cols, mask=col_mask, other=0.0), SOFT_BF16) + weight_offset
        if LLAMA:
            y = _f32(_round(y, NORM.dtype.element_ty, SOFT_BF16), SOFT_BF16) * w[None, :]
        else:  # x * (rstd * w): one rounding into fp32's subnormal range, not two
            y = x * (rstd[:, None] * w[None, :])
    y = _round(y, Y.dtype.element_ty, SOFT_BF16)
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def rmsnorm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    M, N, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr,  # fused op: normalize h = round(x + r), and store h
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,  # round x*rstd to the normalized tensor's dtype before the weight
    BLOCK_N: tl.constexpr,  # the row's first part (looped: its chunk)
    BLOCK_N1: tl.constexpr,  # its second and third parts (0: none), after BLOCK_N
    BLOCK_N2: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (1 when LOOPED)
    LOOPED: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    EARLY_WEIGHT: tl.constexpr,  # load w before x: its latency overlaps x's, not the sum's
    STORE_RSTD: tl.constexpr,  # write rstd (for a backward); RSTD is unused without
):  # fmt: skip
    """Program p normalizes rows [p * ROWS, (p + 1) * ROWS): y = x * rstd * w,
    rstd = 1/sqrt(mean(x^2) + eps).

    Not LOOPED, a row is held in registers as up to three parts of power-of-two widths
    (BLOCK_N, BLOCK_N1, BLOCK_N2), e.g. 5120 = 4096 + 1024: exact for the widths models use,
    where one block padded to the next power of two would leave lanes idle.
    """
    pid = tl.program_id(0).to(tl.int64)
    norm_dtype = H.dtype.element_ty if HAS_RESIDUAL else X.dtype.element_ty

    if not LOOPED:
        NORM = H if HAS_RESIDUAL else X
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_mask = rows < M
        x0, w0 = _fwd_part_load(
            X, R, W, H, rows, row_mask, stride_x, stride_r, stride_h, 0, N, weight_offset,
            BLOCK_N, HAS_RESIDUAL, HAS_WEIGHT, EARLY_WEIGHT, SOFT_BF16,
        )  # fmt: skip
        sum_sq = tl.sum(x0 * x0, axis=1)
        if BLOCK_N1 > 0:
            x1, w1 = _fwd_part_load(
                X, R, W, H, rows, row_mask, stride_x, stride_r, stride_h, BLOCK_N, N,
                weight_offset, BLOCK_N1, HAS_RESIDUAL, HAS_WEIGHT, EARLY_WEIGHT, SOFT_BF16,
            )  # fmt: skip
            sum_sq += tl.sum(x1 * x1, axis=1)
        if BLOCK_N2 > 0:
            x2, w2 = _fwd_part_load(
                X, R, W, H, rows, row_mask, stride_x, stride_r, stride_h, BLOCK_N + BLOCK_N1, N,
                weight_offset, BLOCK_N2, HAS_RESIDUAL, HAS_WEIGHT, EARLY_WEIGHT, SOFT_BF16,
            )  # fmt: skip
            sum_sq += tl.sum(x2 * x2, axis=1)
        rstd = _rstd(sum_sq, N, eps)
        if STORE_RSTD:
            tl.store(RSTD + rows, rstd, mask=row_mask)
        _fwd_part_store(
            W, Y, NORM, x0, w0, rstd, rows, row_mask, stride_y, 0, N, weight_offset,
            BLOCK_N, HAS_WEIGHT, LLAMA, EARLY_WEIGHT, SOFT_BF16,
        )  # fmt: skip
        if BLOCK_N1 > 0:
            _fwd_part_store(
                W, Y, NORM, x1, w1, rstd, rows, row_mask, stride_y, BLOCK_N, N, weight_offset,
                BLOCK_N1, HAS_WEIGHT, LLAMA, EARLY_WEIGHT, SOFT_BF16,
            )  # fmt: skip
        if BLOCK_N2 > 0:
            _fwd_part_store(
                W, Y, NORM, x2, w2, rstd, rows, row_mask, stride_y, BLOCK_N + BLOCK_N1, N,
                weight_offset, BLOCK_N2, HAS_WEIGHT, LLAMA, EARLY_WEIGHT, SOFT_BF16,
            )  # fmt: skip
    else:
        cols = tl.arange(0, BLOCK_N)
        X += pid * stride_x
        Y += pid * stride_y
        if HAS_RESIDUAL:
            R += pid * stride_r
            H += pid * stride_h
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            mask = off + cols < N
            x = _f32(tl.load(X + off + cols, mask=mask, other=0.0), SOFT_BF16)
            if HAS_RESIDUAL:
                r = _f32(tl.load(R + off + cols, mask=mask, other=0.0), SOFT_BF16)
                h = _round(x + r, norm_dtype, SOFT_BF16)
                tl.store(H + off + cols, h, mask=mask)
                x = _f32(h, SOFT_BF16)
            acc += x * x
        rstd = _rstd(tl.sum(acc, axis=0), N, eps)
        if STORE_RSTD:
            tl.store(RSTD + pid, rstd)
        for off in range(0, N, BLOCK_N):
            mask = off + cols < N
            # The fused op re-reads the rounded h it stored (this program's own writes).
            if HAS_RESIDUAL:
                x = _f32(tl.load(H + off + cols, mask=mask, other=0.0), SOFT_BF16)
            else:
                x = _f32(tl.load(X + off + cols, mask=mask, other=0.0), SOFT_BF16)
            y = x * rstd
            if HAS_WEIGHT:
                w = _f32(tl.load(W + off + cols, mask=mask, other=0.0), SOFT_BF16) + weight_offset
                if LLAMA:
                    y = _f32(_round(y, norm_dtype, SOFT_BF16), SOFT_BF16) * w
                else:
                    y = x * (rstd * w)
            tl.store(Y + off + cols, _round(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _bwd_load_chunk(DY, X, dy_row, x_row, off, cols, N):
    """(x, dy) of the chunk [off, off + BLOCK_N) of one row, as stored (0 past N)."""
    mask = off + cols < N
    x = tl.load(X + x_row + off + cols, mask=mask, other=0.0)
    return x, tl.load(DY + dy_row + off + cols, mask=mask, other=0.0)


@triton.jit
def _bwd_prefetch_start(DY, X, row, stride_dy, stride_x, cols, N, PREFETCH: tl.constexpr):
    """The first chunk of a program's first row when prefetching, else placeholders."""
    if PREFETCH:
        x, dy = _bwd_load_chunk(DY, X, row * stride_dy, row * stride_x, 0, cols, N)
    else:  # one return for both: Triton types every return statement it reaches
        x, dy = 0.0, 0.0
    return x, dy


@triton.jit
def _bwd_first_chunk(
    DY, X, x_next, dy_next, row, num_programs, M, stride_dy, stride_x, cols, N,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """(x, dy) of this row's first chunk, and what the next step takes as its own.

    PREFETCH: this row's chunk was loaded the step before, and the next row's loads go out
    now, before anything waits on this row's data (by hand: a row's reduction sits between
    its loads and stores, so little else would be in flight).
    """
    if PREFETCH:
        x, dy = x_next, dy_next
        nxt = tl.minimum(row + num_programs, M - 1)  # past the end: reread a row
        x_next, dy_next = _bwd_load_chunk(DY, X, nxt * stride_dy, nxt * stride_x, 0, cols, N)
    else:
        x, dy = _bwd_load_chunk(DY, X, row * stride_dy, row * stride_x, 0, cols, N)
    return x, dy, x_next, dy_next


@triton.jit
def _bwd_chunk_gx(
    x, dy, W, off, cols, N, weight_offset, HAS_WEIGHT: tl.constexpr, SOFT_BF16: tl.constexpr
):
    """g * x over one chunk of a row (x, dy from _bwd_load_chunk), g = dy * w, in fp32,
    elementwise: the caller reduces (two chunks: their sum, once; looped: each chunk)."""
    g = _f32(dy, SOFT_BF16)
    if HAS_WEIGHT:
        mask = off + cols < N
        g = g * (_f32(tl.load(W + off + cols, mask=mask, other=0.0), SOFT_BF16) + weight_offset)
    return g * _f32(x, SOFT_BF16)


@triton.jit
def _bwd_chunk_dx(
    DY, X, W, DH, DX, DRES, dy_row, x_row, dh_row, dx_row, dres_row,
    off, cols, N, rstd, c, weight_offset,
    HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr, STORE_DRES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):  # fmt: skip
    """Store dx (and dres) of one chunk of a row, c = mean(g * xhat); return dy * xhat,
    the chunk's dweight contribution."""
    mask = off + cols < N
    xhat = _f32(tl.load(X + x_row + off + cols, mask=mask, other=0.0), SOFT_BF16) * rstd
    dy = _f32(tl.load(DY + dy_row + off + cols, mask=mask, other=0.0), SOFT_BF16)
    g = dy
    if HAS_WEIGHT:
        g = dy * (_f32(tl.load(W + off + cols, mask=mask, other=0.0), SOFT_BF16) + weight_offset)
    dx = rstd * (g - xhat * c)
    if HAS_DH:
        dx += _f32(tl.load(DH + dh_row + off + cols, mask=mask, other=0.0), SOFT_BF16)
    tl.store(DX + dx_row + off + cols, _round(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask)
    if STORE_DRES:
        dres = _round(dx, DRES.dtype.element_ty, SOFT_BF16)
        tl.store(DRES + dres_row + off + cols, dres, mask=mask)
    return dy * xhat


@triton.jit
def _bwd_dweight_columns(
    DY, X, RSTD, DW, stride_dy, stride_x, M, N, block,
    DW_ROWS: tl.constexpr, DW_COLS: tl.constexpr, SOFT_BF16: tl.constexpr,
):  # fmt: skip
    """DW[cols] = sum over all rows of dy * (x * rstd) for the block-th DW_COLS columns,
    the rows taken DW_ROWS at a time in a fixed order (deterministic)."""
    cols = block * DW_COLS + tl.arange(0, DW_COLS)
    col_mask = cols < N
    acc = tl.zeros([DW_ROWS, DW_COLS], dtype=tl.float32)
    for r0 in range(0, M, DW_ROWS):
        rows = r0 + tl.arange(0, DW_ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        x = _f32(
            tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0), SOFT_BF16
        )
        dy = _f32(
            tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0), SOFT_BF16
        )
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        acc += dy * (x * rstd[:, None])
    dw = tl.sum(acc, axis=0)
    tl.store(DW + cols, _round(dw, DW.dtype.element_ty, SOFT_BF16), mask=col_mask)


@triton.jit
def rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DH, DX, DRES, DW_PARTIAL,
    stride_dy, stride_x, stride_dh, stride_dx, stride_dres,
    M, N, G, weight_offset,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr,  # fused op: add the gradient that reached h directly
    STORE_DRES: tl.constexpr,  # fused op with residual in another dtype than x: write it too
    BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,  # 1: the row is one block; 2: two blocks; 0: any number (looped)
    SOFT_BF16: tl.constexpr,
    PREFETCH: tl.constexpr,  # load the next row (its first chunk) before this row's sum
    DW_COLS: tl.constexpr,  # 0: dweight by partials (below); else by column programs
    DW_ROWS: tl.constexpr,
):  # fmt: skip
    """Persistent programs: program p < G takes rows p, p+G, ...

    dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd.
    dweight, in fp32, deterministically: with DW_COLS = 0 each row program accumulates its
    share, written to row p of DW_PARTIAL (G, N) for dweight_reduce_kernel; with DW_COLS > 0
    (few rows: one launch instead of two) programs G, G+1, ... each sum a block of DW_COLS
    columns over all rows, reading x and dy again (mostly from L2), into DW_PARTIAL = DW (N,).
    """
    pid = tl.program_id(0)
    if pid >= G:
        if DW_COLS > 0:
            _bwd_dweight_columns(
                DY, X, RSTD, DW_PARTIAL, stride_dy, stride_x, M, N, pid - G,
                DW_ROWS, DW_COLS, SOFT_BF16,
            )  # fmt: skip
    else:
        _bwd_rows(
            DY, X, W, RSTD, DH, DX, DRES, DW_PARTIAL,
            stride_dy, stride_x, stride_dh, stride_dx, stride_dres,
            M, N, G, weight_offset, pid,
            HAS_WEIGHT, HAS_WEIGHT and DW_COLS == 0, HAS_DH, STORE_DRES, BLOCK_N, CHUNKS,
            SOFT_BF16, PREFETCH,
        )  # fmt: skip


@triton.jit
def _bwd_rows(
    DY, X, W, RSTD, DH, DX, DRES, DW_PARTIAL,
    stride_dy, stride_x, stride_dh, stride_dx, stride_dres,
    M, N, num_programs, weight_offset, pid,
    HAS_WEIGHT: tl.constexpr, ROW_DW: tl.constexpr, HAS_DH: tl.constexpr,
    STORE_DRES: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
    SOFT_BF16: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """Row program pid of num_programs (see rmsnorm_bwd_kernel); ROW_DW: accumulate dweight
    partials into row pid of DW_PARTIAL."""
    cols = tl.arange(0, BLOCK_N)
    DW_PARTIAL += pid.to(tl.int64) * N
    n_rows = tl.cdiv(M - pid, num_programs)

    if CHUNKS == 1:
        mask = cols < N
        if HAS_WEIGHT:
            w = _f32(tl.load(W + cols, mask=mask, other=0.0), SOFT_BF16) + weight_offset
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = pid.to(tl.int64)
        x_next, dy_next = _bwd_prefetch_start(DY, X, first, stride_dy, stride_x, cols, N, PREFETCH)
        for i in range(0, n_rows):
            row = pid.to(tl.int64) + i * num_programs
            x_raw, dy_raw, x_next, dy_next = _bwd_first_chunk(
                DY, X, x_next, dy_next, row, num_programs, M, stride_dy, stride_x, cols, N, PREFETCH
            )
            x = _f32(x_raw, SOFT_BF16)
            dy = _f32(dy_raw, SOFT_BF16)
            rstd = tl.load(RSTD + row)
            g = dy * w if HAS_WEIGHT else dy
            # mean(g * xhat) with rstd applied after the sum: the sum does not wait on rstd's
            # load, so the next row's loads go out before it (as in the two-chunk layout).
            c = tl.sum(g * x, axis=0) * rstd / N
            xhat = x * rstd
            dx = rstd * (g - xhat * c)
            if HAS_DH:
                dx += _f32(tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0), SOFT_BF16)
            tl.store(
                DX + row * stride_dx + cols, _round(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask
            )
            if STORE_DRES:
                tl.store(
                    DRES + row * stride_dres + cols,
                    _round(dx, DRES.dtype.element_ty, SOFT_BF16),
                    mask=mask,
                )
            if ROW_DW:
                dw_acc += dy * xhat
        if ROW_DW:
            tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
    else:
        # Each row is walked in chunks twice: sum(g * x), then dx (the second pass mostly
        # hits L1/L2). Two chunks keep both halves of dweight in registers; a row of one
        # block would hold x, dy, w and dweight at once and spill at 16384 columns. The
        # looped layout adds into its row of DW_PARTIAL (zeroed; no other program touches it).
        dw_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
        dw_hi = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = pid.to(tl.int64)
        x_next, dy_next = _bwd_prefetch_start(DY, X, first, stride_dy, stride_x, cols, N, PREFETCH)
        for i in range(0, n_rows):
            row = pid.to(tl.int64) + i * num_programs
            rstd = tl.load(RSTD + row)
            dy_row, x_row = row * stride_dy, row * stride_x
            dh_row, dx_row, dres_row = row * stride_dh, row * stride_dx, row * stride_dres
            if CHUNKS == 2:
                x_lo, dy_lo, x_next, dy_next = _bwd_first_chunk(
                    DY, X, x_next, dy_next, row, num_programs, M, stride_dy, stride_x, cols, N,
                    PREFETCH,
                )  # fmt: skip
                x_hi, dy_hi = _bwd_load_chunk(DY, X, dy_row, x_row, BLOCK_N, cols, N)
                gx_lo = _bwd_chunk_gx(
                    x_lo, dy_lo, W, 0, cols, N, weight_offset, HAS_WEIGHT, SOFT_BF16
                )
                gx_hi = _bwd_chunk_gx(
                    x_hi, dy_hi, W, BLOCK_N, cols, N, weight_offset, HAS_WEIGHT, SOFT_BF16
                )
                gx = tl.sum(gx_lo + gx_hi, axis=0)  # the halves' products added: one reduction
            else:  # one sum per chunk: a block-wide accumulator ran 3% slower (NOTES.md)
                gx = 0.0
                for off in range(0, N, BLOCK_N):
                    x, dy = _bwd_load_chunk(DY, X, dy_row, x_row, off, cols, N)
                    gx += tl.sum(
                        _bwd_chunk_gx(x, dy, W, off, cols, N, weight_offset, HAS_WEIGHT, SOFT_BF16),
                        axis=0,
                    )
            c = gx * rstd / N  # mean(g * xhat)
            if CHUNKS == 2:
                dw_lo += _bwd_chunk_dx(
                    DY, X, W, DH, DX, DRES, dy_row, x_row, dh_row, dx_row, dres_row,
                    0, cols, N, rstd, c, weight_offset,
                    HAS_WEIGHT, HAS_DH, STORE_DRES, SOFT_BF16,
                )  # fmt: skip
                dw_hi += _bwd_chunk_dx(
                    DY, X, W, DH, DX, DRES, dy_row, x_row, dh_row, dx_row, dres_row,
                    BLOCK_N, cols, N, rstd, c, weight_offset,
                    HAS_WEIGHT, HAS_DH, STORE_DRES, SOFT_BF16,
                )  # fmt: skip
            else:
                for off in range(0, N, BLOCK_N):
                    dw = _bwd_chunk_dx(
                        DY, X, W, DH, DX, DRES, dy_row, x_row, dh_row, dx_row, dres_row,
                        off, cols, N, rstd, c, weight_offset,
                        HAS_WEIGHT, HAS_DH, STORE_DRES, SOFT_BF16,
                    )  # fmt: skip
                    if ROW_DW:
                        mask = off + cols < N
                        p = tl.load(DW_PARTIAL + off + cols, mask=mask, other=0.0)
                        tl.store(DW_PARTIAL + off + cols, p + dw, mask=mask)
        if ROW_DW and CHUNKS == 2:
            tl.store(DW_PARTIAL + cols, dw_lo)
            tl.store(DW_PARTIAL + BLOCK_N + cols, dw_hi, mask=BLOCK_N + cols < N)


@triton.jit
def dweight_reduce_kernel(
    DW_PARTIAL, DW, G, N,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_BF16: tl.constexpr,
):  # fmt: skip
    """DW[n] = sum over g of DW_PARTIAL[g, n], in a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]  # G * N may pass 2^31
        acc += tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0)
    tl.store(DW + cols, _round(tl.sum(acc, axis=0), DW.dtype.element_ty, SOFT_BF16), mask=col_mask)


# ---- launch shapes: functions of the problem's shape (and the device) only ----


def row_block(n: int) -> tuple[int, bool]:
    """(BLOCK_N, LOOPED) for rows of n elements."""
    if n <= MAX_BLOCK_N:
        return 1 << (n - 1).bit_length(), False  # next power of two, in plain Python: cheap
    return LOOP_BLOCK_N, True


def row_num_warps(block_n: int) -> int:
    """Warps for a program that holds block_n elements of a row (about 16 per thread)."""
    return max(1, min(16, block_n // 512))


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def row_parts(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_N1, BLOCK_N2): a row of n <= MAX_BLOCK_N elements as up to three
    power-of-two parts, the largest first; only the last may reach past n (e.g. 5120:
    4096 + 1024; 7168: 4096 + 2048 + 1024; 1000: 512 + 256 + 256)."""
    b0 = _pow2_floor(n)
    rest = n - b0
    b1 = _pow2_floor(rest) if rest else 0
    rest -= b1
    return b0, b1, (1 << (rest - 1).bit_length()) if rest else 0


def fwd_launch(
    m: int, n: int, fused: bool = False
) -> tuple[tuple[int, int, int], int, bool, int, bool]:
    """((BLOCK_N, BLOCK_N1, BLOCK_N2), ROWS, LOOPED, num_warps, EARLY_WEIGHT) of the forward
    kernel (fused: with a residual) for m rows of n elements.

    Powers of two and narrow rows: one block. A program holds at least FWD_MIN_ELEMS
    elements: rows narrower than that go several to a program (H100, 65536x256: 41.1 us with
    one row, 24.9 with four; copy 24.2). The weight is loaded before x up to 4096 columns,
    where rows are latency-bound (256x4096 warm: 2.7 -> 2.4 us); in wider blocks the early
    load made the kernel slower (4096x16384: 92 -> 101 us).
    Widths between powers of two from 2048 to 8192 (3072 ... 7168): fewer warps, so more
    rows are in flight per SM; the forward takes the row as two parts where the first is
    4096 or more (4096x5120: 29.1 -> 28.2 us cold, 4608: 28.5 -> 26.9; with a tail of at
    most an eighth of it, 4608, the weight early: 26.9 -> 25.6), else a padded block (7168:
    8 warps, 36.0 -> 34.8), the fused op one padded block with the weight loaded early
    (4096x5120: 46.4 -> 45.9). bench/NOTES.md has the sweeps.
    """
    block_n, looped = row_block(n)
    if looped:
        return (block_n, 0, 0), 1, True, row_num_warps(block_n), False
    if block_n == n or n < 2048 or block_n > 8192:
        rows = max(1, FWD_MIN_ELEMS // block_n)
        return (block_n, 0, 0), rows, False, row_num_warps(block_n * rows), block_n <= 4096
    if fused:
        return (block_n, 0, 0), 1, False, 4, True
    parts = row_parts(n)
    if parts[2] == 0 and parts[0] >= 4096:
        return parts, 1, False, 4, 8 * parts[1] <= parts[0]  # a short tail: weight early
    if block_n <= 4096:
        return (block_n, 0, 0), 2, False, 8, False
    return (block_n, 0, 0), 1, False, 8, False


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_launch(m: int, n: int, device: torch.device) -> tuple[int, int, int, int, bool, int]:
    """(BLOCK_N, CHUNKS, programs, num_warps, PREFETCH, DW_COLS) of the persistent backward
    kernel for m rows of n elements (programs: its row programs).

    Layout: one block up to BWD_MAX_BLOCK_N; two (dweight halves in registers) up to twice
    that; beyond, looped. Programs per SM fall as blocks grow wider (each keeps a
    block-wide fp32 dweight accumulator). Prefetching the next row (its first chunk, with
    two) pays where its registers fit: not at 16384 columns. Up to BWD_COLUMN_ROWS rows,
    dweight is summed by column programs of the same launch (DW_COLS columns each) instead
    of per-program partials and a second kernel (H200, backward alone, 256x4096: 12.3 ->
    8.0 us cold, 6.3 -> 3.9 warm; 1024x4096: 17.6 -> 14.6 cold). Sweeps: bench/NOTES.md.
    """
    if n <= BWD_MAX_BLOCK_N:
        block_n, chunks = 1 << (n - 1).bit_length(), 1
    else:
        block_n, chunks = BWD_MAX_BLOCK_N, 2 if n <= 2 * BWD_MAX_BLOCK_N else 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _sm_count(index)
    else:  # Triton's interpreter on the CPU
        sms = 4
    per_sm = max(1, min(8, 8192 // block_n))
    prefetch = chunks == 1 or (chunks == 2 and 2 * n <= 3 * BWD_MAX_BLOCK_N)
    dw_cols = 0 if m > BWD_COLUMN_ROWS else BWD_DW_COLS if n <= 4096 else 2 * BWD_DW_COLS
    programs = max(1, min(m, per_sm * sms))
    return block_n, chunks, programs, row_num_warps(block_n), prefetch, dw_cols
