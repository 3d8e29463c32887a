"""RMSNorm ops: argument checks, dispatch, torch.library registration and autograd.

The kernels (kernels.py) are wrapped in three custom ops, opaque to torch.compile and safe
under CUDA-graph capture (no host syncs; allocations depend on shapes only):

  accel_torch::rmsnorm_fwd(x, weight?, eps, weight_offset, llama) -> (y, rstd)
  accel_torch::rmsnorm_residual_fwd(x, residual, weight?, eps, weight_offset, llama, h_dtype)
      -> (y, h, rstd)
  accel_torch::rmsnorm_bwd(dy, x, weight?, rstd, dh?, weight_offset, dres_dtype?)
      -> (dx, dres, dweight)

rstd (fp32, one per row) is an op output so that autograd can save it; backward saves only
the normalized input (x, or h for the fused op) and rstd.
"""

import torch
import triton

from . import _config
from .kernels import (
    bwd_num_programs,
    dweight_reduce_kernel,
    rmsnorm_bwd_kernel,
    rmsnorm_fwd_kernel,
    row_block,
    row_num_warps,
)
from .reference import normalize_math, residual_add_math
from .validation import check_residual_args, check_rmsnorm_args

_EMPTY = (0,)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view of t with a contiguous last dim; copies only if no such view exists."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


# ---- forward ----


@torch.library.custom_op("accel_torch::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float, llama: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward. x: (..., N); weight: (N,) or None. Returns y (x.shape, x.dtype) and
    rstd (x.shape[:-1], float32)."""
    y = x.new_empty(x.shape)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    _launch_fwd(x, None, weight, y, None, rstd, eps, weight_offset, llama)
    return y, rstd


@rmsnorm_fwd.register_fake
def _(x, weight, eps, weight_offset, llama):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("accel_torch::rmsnorm_residual_fwd", mutates_args=())
def rmsnorm_residual_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    llama: bool,
    h_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel fused forward: h = round(h_dtype, x + residual); y = rmsnorm(h) in x.dtype.
    Returns y, h (x.shape, h_dtype) and rstd (x.shape[:-1], float32)."""
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape, dtype=h_dtype)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    _launch_fwd(x, residual, weight, y, h, rstd, eps, weight_offset, llama)
    return y, h, rstd


@rmsnorm_residual_fwd.register_fake
def _(x, residual, weight, eps, weight_offset, llama, h_dtype):
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape, dtype=h_dtype),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


def _launch_fwd(x, residual, weight, y, h, rstd, eps, weight_offset, llama):
    n = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    if m == 0:
        return
    y2, rstd1 = y.view(m, n), rstd.view(m)
    if residual is not None:
        r2, h2 = _rows(residual), h.view(m, n)
    else:
        r2 = h2 = x2  # unused by the kernel (HAS_RESIDUAL=False)
    block_n, looped = row_block(n)
    rmsnorm_fwd_kernel[(m,)](
        x2, r2, weight if weight is not None else x2, y2, h2, rstd1,
        _row_stride(x2), _row_stride(r2), n, n,
        n, eps, weight_offset,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        LLAMA=llama,
        BLOCK_N=block_n,
        LOOPED=looped,
        SOFT_BF16=_config.SOFT_BF16,
        num_warps=row_num_warps(block_n),
    )  # fmt: skip


# ---- backward ----


@torch.library.custom_op("accel_torch::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
    weight_offset: float,
    dres_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel backward of y = rmsnorm(x).

    dy, x: (..., N); rstd: x.shape[:-1] float32; dh: optional (..., N) gradient reaching x
    directly (the fused op's h output). Returns dx (x.shape, dy.dtype); dres (x.shape,
    dres_dtype) when dres_dtype is given, else an empty tensor; dweight ((N,), weight.dtype)
    when weight is given, else an empty tensor.
    """
    n = x.shape[-1]
    dx = dy.new_empty(x.shape)
    dres = (
        dy.new_empty(x.shape, dtype=dres_dtype) if dres_dtype is not None else dy.new_empty(_EMPTY)
    )
    dweight = weight.new_empty((n,)) if weight is not None else dy.new_empty(_EMPTY)
    x2, dy2 = _rows(x), _rows(dy)
    m = x2.shape[0]
    if m == 0:
        if weight is not None:
            dweight.zero_()
        return dx, dres, dweight
    dh2 = _rows(dh) if dh is not None else dy2
    dres2 = dres.view(m, n) if dres_dtype is not None else dy2
    block_n, looped = row_block(n)
    g = bwd_num_programs(m, x.device)
    # The looped kernel accumulates into its row of partial, so it must start at zero.
    alloc = x.new_zeros if looped else x.new_empty
    partial = alloc((g, n), dtype=torch.float32)
    rmsnorm_bwd_kernel[(g,)](
        dy2, x2, weight if weight is not None else x2, rstd.view(m), dh2, dx.view(m, n), dres2,
        partial,
        _row_stride(dy2), _row_stride(x2), _row_stride(dh2), n, n,
        m, n, weight_offset,
        HAS_WEIGHT=weight is not None,
        HAS_DH=dh is not None,
        STORE_DRES=dres_dtype is not None,
        BLOCK_N=block_n,
        LOOPED=looped,
        SOFT_BF16=_config.SOFT_BF16,
        num_warps=row_num_warps(block_n),
    )  # fmt: skip
    if weight is not None:
        reduce_block_n = 128
        dweight_reduce_kernel[(triton.cdiv(n, reduce_block_n),)](
            partial,
            dweight,
            g,
            n,
            BLOCK_G=32,
            BLOCK_N=reduce_block_n,
            SOFT_BF16=_config.SOFT_BF16,
            num_warps=4,
        )
    return dx, dres, dweight


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd, dh, weight_offset, dres_dtype):
    n = x.shape[-1]
    dres = (
        dy.new_empty(x.shape, dtype=dres_dtype) if dres_dtype is not None else dy.new_empty(_EMPTY)
    )
    dweight = weight.new_empty((n,)) if weight is not None else dy.new_empty(_EMPTY)
    return dy.new_empty(x.shape), dres, dweight


# ---- autograd ----


def _fwd_setup_context(ctx, inputs, output):
    x, weight, _eps, weight_offset, _llama = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.weight_offset = weight_offset


def _fwd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None
    dx, _dres, dweight = rmsnorm_bwd(dy, x, weight, rstd, None, ctx.weight_offset, None)
    dweight = dweight if weight is not None and ctx.needs_input_grad[1] else None
    return dx, dweight, None, None, None


rmsnorm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _residual_setup_context(ctx, inputs, output):
    x, residual, weight, _eps, weight_offset, _llama, _h_dtype = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype


def _residual_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:  # only h was used: the gradient passes through the add unchanged
        return dh.to(ctx.x_dtype), dh.to(ctx.residual_dtype), None, None, None, None, None
    dres_dtype = ctx.residual_dtype if ctx.residual_dtype != dy.dtype else None
    dx, dres, dweight = rmsnorm_bwd(dy, h, weight, rstd, dh, ctx.weight_offset, dres_dtype)
    if dres_dtype is None:
        dres = dx  # same values and dtype; autograd handles one tensor feeding two inputs
    dweight = dweight if weight is not None and ctx.needs_input_grad[2] else None
    return dx, dres, dweight, None, None, None, None


rmsnorm_residual_fwd.register_autograd(_residual_backward, setup_context=_residual_setup_context)


# ---- public API ----


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or (x.device.type == "cpu" and _config.interpret_enabled())


def rmsnorm(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32"):
    """RMSNorm over the last axis: ``y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    Args:
        x: (..., N) tensor, float32 / float16 / bfloat16; any leading shape, 0 rows allowed.
            A last dimension with stride 1 is read in place (rows may be strided).
        weight: optional (N,) floating tensor (its dtype may differ from x's).
        eps: >= 0, added to the mean square.
        weight_offset: added to weight in fp32 (1.0 for Gemma's ``1 + weight``).
        casting: "fp32" (default): y rounded once from fp32; "llama": x*rstd rounded to x's
            dtype before the weight, as Hugging Face's LlamaRMSNorm.
    Returns:
        (..., N) tensor of x's dtype. Differentiable in x and weight.

    CUDA tensors run the Triton kernels; other devices the same math in torch ops
    (``rmsnorm_torch``), or the kernels in Triton's interpreter with ``ACCEL_INTERPRET=1``.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    if not _use_kernels(x):
        return normalize_math(x, weight, eps, weight_offset, casting, x.dtype)
    y, _rstd = rmsnorm_fwd(x, weight, eps, weight_offset, casting == "llama")
    return y


def rmsnorm_residual_fused(
    x,
    residual,
    weight=None,
    eps=1e-6,
    *,
    weight_offset=0.0,
    casting="fp32",
    return_residual=False,
    residual_dtype=None,
):
    """Fused residual add + RMSNorm: ``h = round(residual_dtype or x.dtype, x + residual)``,
    ``y = rmsnorm(h)`` in one pass over memory.

    Args:
        x, residual: (..., N) floating tensors of the same shape and device.
        weight, eps, weight_offset, casting: as in :func:`rmsnorm`.
        return_residual: also return h (the new residual stream).
        residual_dtype: dtype of h (default x's dtype), e.g. torch.float32 for an fp32
            residual stream.
    Returns:
        y of x's dtype, or ``(y, h)`` with ``return_residual=True``. Gradients flow to x,
        residual and weight; d residual = d x.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    h_dtype = check_residual_args(x, residual, residual_dtype)
    if not _use_kernels(x):
        h = residual_add_math(x, residual, h_dtype)
        y = normalize_math(h, weight, eps, weight_offset, casting, x.dtype)
    else:
        y, h, _rstd = rmsnorm_residual_fwd(
            x, residual, weight, eps, weight_offset, casting == "llama", h_dtype
        )
    return (y, h) if return_residual else y
