"""Triton kernels for RMSNorm and fused residual-add RMSNorm, and their launch shapes.

Every kernel works on a 2-D view (M rows, N columns) whose last dimension is contiguous;
rows may be strided. Statistics and arithmetic are fp32; each output is rounded once.

Two layouts of a row:
  * one block (N <= MAX_BLOCK_N): the row is loaded once into registers;
  * looped (N > MAX_BLOCK_N): the row is walked in chunks of BLOCK_N, twice (statistics,
    then output); the second pass mostly hits L2.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_BLOCK_N = 16384  # largest row kept whole in registers
LOOP_BLOCK_N = 8192  # chunk of the looped path


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
def rmsnorm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    N, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr,  # fused op: normalize h = round(x + r), and store h
    HAS_WEIGHT: tl.constexpr,
    LLAMA: tl.constexpr,  # round x*rstd to the normalized tensor's dtype before the weight
    BLOCK_N: tl.constexpr,
    LOOPED: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):  # fmt: skip
    """One program per row: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    if HAS_RESIDUAL:
        R += row * stride_r
        H += row * stride_h
    norm_dtype = H.dtype.element_ty if HAS_RESIDUAL else X.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)

    if not LOOPED:
        mask = cols < N
        x = _f32(tl.load(X + cols, mask=mask, other=0.0), SOFT_BF16)
        if HAS_RESIDUAL:
            r = _f32(tl.load(R + cols, mask=mask, other=0.0), SOFT_BF16)
            h = _round(x + r, norm_dtype, SOFT_BF16)
            tl.store(H + cols, h, mask=mask)
            x = _f32(h, SOFT_BF16)
        rstd = _rstd(tl.sum(x * x, axis=0), N, eps)
        tl.store(RSTD + row, rstd)
        y = x * rstd
        if HAS_WEIGHT:
            w = _f32(tl.load(W + cols, mask=mask, other=0.0), SOFT_BF16) + weight_offset
            if LLAMA:
                y = _f32(_round(y, norm_dtype, SOFT_BF16), SOFT_BF16) * w
            else:  # x * (rstd * w): one rounding into fp32's subnormal range, not two
                y = x * (rstd * w)
        tl.store(Y + cols, _round(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
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
        tl.store(RSTD + row, rstd)
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
def rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DH, DX, DRES, DW_PARTIAL,
    stride_dy, stride_x, stride_dh, stride_dx, stride_dres,
    M, N, weight_offset,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr,  # fused op: add the gradient that reached h directly
    STORE_DRES: tl.constexpr,  # fused op with residual in another dtype than x: write it too
    BLOCK_N: tl.constexpr,
    LOOPED: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """Persistent programs: program p takes rows p, p+G, ... and accumulates its share of
    dweight in fp32, written to row p of DW_PARTIAL (G, N) for a deterministic reduction.

    dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd.
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    DW_PARTIAL += pid.to(tl.int64) * N

    if not LOOPED:
        mask = cols < N
        if HAS_WEIGHT:
            w = _f32(tl.load(W + cols, mask=mask, other=0.0), SOFT_BF16) + weight_offset
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # Loads of the next row are issued before this row's reduction (by hand: a row's
        # reduction sits between its loads and stores, so little else would be in flight).
        row = pid.to(tl.int64)
        x_next = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        dy_next = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0)
        for i in range(0, tl.cdiv(M - pid, num_programs)):
            row = pid.to(tl.int64) + i * num_programs
            x = _f32(x_next, SOFT_BF16)
            dy = _f32(dy_next, SOFT_BF16)
            if PREFETCH:
                nxt = tl.minimum(row + num_programs, M - 1)  # past the end: reread a row
                x_next = tl.load(X + nxt * stride_x + cols, mask=mask, other=0.0)
                dy_next = tl.load(DY + nxt * stride_dy + cols, mask=mask, other=0.0)
            else:
                x = _f32(tl.load(X + row * stride_x + cols, mask=mask, other=0.0), SOFT_BF16)
                dy = _f32(tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0), SOFT_BF16)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            g = dy * w if HAS_WEIGHT else dy
            c = tl.sum(g * xhat, axis=0) / N
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
            if HAS_WEIGHT:
                dw_acc += dy * xhat
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
    else:
        # DW_PARTIAL starts zeroed; each program owns its row, so no two programs touch it.
        for i in range(0, tl.cdiv(M - pid, num_programs)):
            row = pid.to(tl.int64) + i * num_programs
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                mask = off + cols < N
                x = _f32(tl.load(X + row * stride_x + off + cols, mask=mask, other=0.0), SOFT_BF16)
                g = _f32(
                    tl.load(DY + row * stride_dy + off + cols, mask=mask, other=0.0), SOFT_BF16
                )
                if HAS_WEIGHT:
                    w = _f32(tl.load(W + off + cols, mask=mask, other=0.0), SOFT_BF16)
                    g = g * (w + weight_offset)
                acc += g * x
            c = tl.sum(acc, axis=0) * rstd / N  # mean(g * xhat)
            for off in range(0, N, BLOCK_N):
                mask = off + cols < N
                x = _f32(tl.load(X + row * stride_x + off + cols, mask=mask, other=0.0), SOFT_BF16)
                dy = _f32(
                    tl.load(DY + row * stride_dy + off + cols, mask=mask, other=0.0), SOFT_BF16
                )
                xhat = x * rstd
                g = dy
                if HAS_WEIGHT:
                    w = _f32(tl.load(W + off + cols, mask=mask, other=0.0), SOFT_BF16)
                    g = dy * (w + weight_offset)
                dx = rstd * (g - xhat * c)
                if HAS_DH:
                    dh_ptr = DH + row * stride_dh + off + cols
                    dx += _f32(tl.load(dh_ptr, mask=mask, other=0.0), SOFT_BF16)
                tl.store(
                    DX + row * stride_dx + off + cols,
                    _round(dx, DX.dtype.element_ty, SOFT_BF16),
                    mask=mask,
                )
                if STORE_DRES:
                    dres_ptr = DRES + row * stride_dres + off + cols
                    tl.store(dres_ptr, _round(dx, DRES.dtype.element_ty, SOFT_BF16), mask=mask)
                if HAS_WEIGHT:
                    p = tl.load(DW_PARTIAL + off + cols, mask=mask, other=0.0)
                    tl.store(DW_PARTIAL + off + cols, p + dy * xhat, mask=mask)


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
        acc += tl.load(DW_PARTIAL + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_launch(m: int, block_n: int, device: torch.device) -> tuple[int, int, bool]:
    """(programs, num_warps, PREFETCH) of the persistent backward kernel.

    Programs per SM fall as rows grow wider (each program keeps a row-wide fp32 dweight
    accumulator); prefetching the next row doubles the registers a row takes, so it stops
    at 8192 elements. Measured on an H100: see bench/NOTES.md.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _sm_count(index)
    else:  # Triton's interpreter on the CPU
        sms = 4
    per_sm = max(1, min(8, 8192 // block_n))
    return max(1, min(m, per_sm * sms)), row_num_warps(block_n), block_n <= 8192
