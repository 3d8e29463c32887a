"""Host side of the kernels: output allocation, 2-D views and kernel launches.

Allocation and launch choices depend on shapes (and the device) only, never on values, so
everything here is safe under CUDA-graph capture and under torch.compile's opaque ops.
"""

import torch

from . import _config

try:
    import triton
except ImportError:  # CPU-only torch, macOS: the ops use the reference math instead
    triton = None
else:
    from .kernels import (
        BWD_DW_ROWS,
        bwd_launch,
        dweight_reduce_kernel,
        fwd_launch,
        rmsnorm_bwd_kernel,
        rmsnorm_fwd_kernel,
    )
    from .launcher import Launcher

    _fwd = Launcher(rmsnorm_fwd_kernel)
    _bwd = Launcher(rmsnorm_bwd_kernel)
    _reduce = Launcher(dweight_reduce_kernel)

NO_TRITON = (
    "accel_torch's kernels need Triton, which is not installed: install it (pip install "
    "triton, Linux) or move the tensors to the CPU, where the reference math runs"
)

_EMPTY = (0,)
REDUCE_BLOCK_G, REDUCE_BLOCK_N = 256, 16  # dweight reduction tile (H100 sweep, NOTES.md)


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view of t with a contiguous last dim; copies only if no such view exists."""
    if t.dim() == 2 and t.stride(1) == 1:  # the common case: t itself, no new view
        return t
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D tensor (weight, rstd) the kernels index as t[i]: any other stride (a strided
    view, an expanded one of stride 0) is copied to a contiguous tensor first."""
    if t is None or t.stride(0) == 1 or t.shape[0] <= 1:
        return t
    return t.contiguous()


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def empty_fwd_outputs(x, h_dtype, rstd=True):
    """Uninitialized (y, h or None, rstd or None) for a forward of x; h only when h_dtype is
    given."""
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape, dtype=h_dtype) if h_dtype is not None else None
    return y, h, x.new_empty(x.shape[:-1], dtype=torch.float32) if rstd else None


def empty_bwd_outputs(dy, x, weight, dres_dtype):
    """Uninitialized (dx, dres or None, dweight or None)."""
    dres = dy.new_empty(x.shape, dtype=dres_dtype) if dres_dtype is not None else None
    dweight = weight.new_empty(weight.shape) if weight is not None else None
    return dy.new_empty(x.shape), dres, dweight


def absent_as_empty(dy, outputs):
    """Absent outputs as empty (0,) tensors: a custom op must return tensors."""
    return tuple(t if t is not None else dy.new_empty(_EMPTY) for t in outputs)


def rmsnorm_fwd_launch(x, residual, weight, eps, weight_offset, llama, h_dtype, rstd=True):
    """Run the forward kernel.

    x, residual: (..., N), residual may be None; weight: (N,) or None. With a residual,
    h = round(h_dtype, x + residual) is normalized and returned.
    Returns y (x.shape, x.dtype), h (x.shape, h_dtype) or None, rstd (x.shape[:-1], fp32;
    None with rstd=False: a forward no backward will follow).
    """
    if triton is None:
        raise RuntimeError(f"{NO_TRITON} (got a tensor on {x.device})")
    y, h, rstd_out = empty_fwd_outputs(x, h_dtype if residual is not None else None, rstd)
    flat = x.dim() != 2  # 2-D inputs (the common case) need no views
    x2 = rows_view(x)
    m, n = x2.shape
    if m == 0:
        return y, h, rstd_out
    if residual is not None:
        r2 = rows_view(residual)
        h2 = h.view(m, n) if flat else h
    else:
        r2 = h2 = x2  # unused by the kernel (HAS_RESIDUAL=False)
    if weight is not None and weight.stride(0) != 1:
        weight = _dense(weight)
    parts, rows, looped, num_warps, early_weight = fwd_launch(m, n, residual is not None)
    _fwd(
        (m + rows - 1) // rows,
        (x2, r2, weight if weight is not None else x2, y.view(m, n) if flat else y, h2,
         (rstd_out.view(m) if flat else rstd_out) if rstd else x2),
        (_row_stride(x2), _row_stride(r2), n, n, m, n),
        (eps, weight_offset),
        (residual is not None, weight is not None, llama, *parts, rows, looped,
         _config.SOFT_BF16, early_weight, rstd),
        num_warps,
    )  # fmt: skip
    return y, h, rstd_out


def rmsnorm_bwd_launch(dy, x, weight, rstd, dh, weight_offset, dres_dtype):
    """Run the backward kernels of y = rmsnorm(x).

    dy, x: (..., N); rstd: x.shape[:-1] fp32; dh: optional (..., N) gradient reaching x
    directly (the fused op's h). Returns dx (x.shape, dy.dtype); dres (x.shape, dres_dtype)
    when dres_dtype is given, else None; dweight ((N,), weight.dtype) when weight is given,
    else None.
    """
    if triton is None:
        raise RuntimeError(f"{NO_TRITON} (got a tensor on {x.device})")
    dx, dres, dweight = empty_bwd_outputs(dy, x, weight, dres_dtype)
    flat = x.dim() != 2  # 2-D inputs (the common case) need no views
    x2, dy2 = rows_view(x), rows_view(dy)
    m, n = x2.shape
    if m == 0:
        return dx, dres, dweight.zero_() if dweight is not None else None
    dh2 = rows_view(dh) if dh is not None else dy2
    if weight is not None and weight.stride(0) != 1:
        weight = _dense(weight)
    rstd = _dense(rstd.reshape(m)) if flat or rstd.stride(0) != 1 else rstd
    block_n, chunks, programs, num_warps, prefetch, dw_cols = bwd_launch(m, n, x.device)
    has_weight, has_dh, store_dres = weight is not None, dh is not None, dres_dtype is not None
    dw_cols = dw_cols if has_weight else 0
    if dw_cols:  # dweight summed by column programs of the same launch
        partial, grid = dweight, programs + (n + dw_cols - 1) // dw_cols
    else:  # the looped kernel adds into its row of partial, so that starts at zero
        alloc = x.new_zeros if chunks == 0 else x.new_empty
        partial, grid = (
            alloc((programs, n) if has_weight else _EMPTY, dtype=torch.float32),
            programs,
        )
    _bwd(
        grid,
        (dy2, x2, weight if has_weight else x2, rstd, dh2, dx.view(m, n) if flat else dx,
         (dres.view(m, n) if flat else dres) if store_dres else dy2, partial),
        (_row_stride(dy2), _row_stride(x2), _row_stride(dh2), n, n, m, n, programs),
        (weight_offset,),
        (has_weight, has_dh, store_dres, block_n, chunks, _config.SOFT_BF16, prefetch,
         dw_cols, BWD_DW_ROWS),
        num_warps,
    )  # fmt: skip
    if has_weight and not dw_cols:
        _reduce(
            (n + REDUCE_BLOCK_N - 1) // REDUCE_BLOCK_N,
            (partial, dweight),
            (programs, n),
            (),
            (REDUCE_BLOCK_G, REDUCE_BLOCK_N, _config.SOFT_BF16),
            4,
        )
    return dx, dres, dweight
