"""RMSNorm ops: argument checks, dispatch, torch.library registration and autograd.

Two routes to the same kernels (launch.py) and the same gradient rules:

* eager calls go through small torch.autograd.Functions, which cost little on the host;
* under torch.compile / export the kernels are three custom ops, opaque to the compiler
  and safe under CUDA-graph capture:

    accel_torch::rmsnorm_fwd(x, weight?, eps, weight_offset, llama) -> (y, rstd)
    accel_torch::rmsnorm_residual_fwd(x, residual, weight?, eps, weight_offset, llama,
        h_dtype) -> (y, h, rstd)
    accel_torch::rmsnorm_bwd(dy, x, weight?, rstd, dh?, weight_offset, dres_dtype?)
        -> (dx, dres, dweight)

rstd (fp32, one per row) is an output so that autograd can save it; backward saves only the
normalized input (x, or h for the fused op) and rstd.
"""

import torch

from . import _config
from .launch import (
    absent_as_empty,
    empty_bwd_outputs,
    empty_fwd_outputs,
    rmsnorm_bwd_launch,
    rmsnorm_fwd_launch,
)
from .reference import normalize_math, residual_add_math
from .validation import check_residual_args, check_rmsnorm_args

# ---- custom ops: the torch.compile route ----


@torch.library.custom_op("accel_torch::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float, llama: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward. x: (..., N); weight: (N,) or None. Returns y (x.shape, x.dtype) and
    rstd (x.shape[:-1], float32)."""
    y, _h, rstd = rmsnorm_fwd_launch(x, None, weight, eps, weight_offset, llama, None)
    return y, rstd


@rmsnorm_fwd.register_fake
def _(x, weight, eps, weight_offset, llama):
    y, _h, rstd = empty_fwd_outputs(x, None)
    return y, rstd


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
    return rmsnorm_fwd_launch(x, residual, weight, eps, weight_offset, llama, h_dtype)


@rmsnorm_residual_fwd.register_fake
def _(x, residual, weight, eps, weight_offset, llama, h_dtype):
    return empty_fwd_outputs(x, h_dtype)


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
    """Kernel backward; see launch.rmsnorm_bwd_launch for shapes and dtypes (an absent dres
    or dweight is an empty (0,) tensor here)."""
    return absent_as_empty(
        dy, rmsnorm_bwd_launch(dy, x, weight, rstd, dh, weight_offset, dres_dtype)
    )


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd, dh, weight_offset, dres_dtype):
    return absent_as_empty(dy, empty_bwd_outputs(dy, x, weight, dres_dtype))


# ---- gradient rules, shared by both routes (bwd: the custom op or the launcher) ----


def _save_rmsnorm(ctx, x, weight, rstd, weight_offset):
    ctx.save_for_backward(x, weight, rstd)
    ctx.weight_offset = weight_offset


def _rmsnorm_grads(bwd, ctx, dy):
    """(dx, dweight) of y = rmsnorm(x)."""
    x, weight, rstd = ctx.saved_tensors
    dx, _dres, dweight = bwd(dy, x, weight, rstd, None, ctx.weight_offset, None)
    return dx, dweight if weight is not None and ctx.needs_input_grad[1] else None


def _save_residual(ctx, x, residual, weight, h, rstd, weight_offset):
    ctx.save_for_backward(h, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype


def _residual_grads(bwd, ctx, dy, dh):
    """(dx, dresidual, dweight) of y, h = fused(x, residual); d residual = d x."""
    h, weight, rstd = ctx.saved_tensors
    if dy is None:  # only h was used: its gradient passes through the add unchanged
        return dh.to(ctx.x_dtype), dh.to(ctx.residual_dtype), None
    dres_dtype = ctx.residual_dtype if ctx.residual_dtype != dy.dtype else None
    dx, dres, dweight = bwd(dy, h, weight, rstd, dh, ctx.weight_offset, dres_dtype)
    if dres_dtype is None:
        dres = dx  # same values and dtype; autograd lets one tensor feed two inputs
    return dx, dres, dweight if weight is not None and ctx.needs_input_grad[2] else None


def _fwd_setup_context(ctx, inputs, output):
    x, weight, _eps, weight_offset, _llama = inputs
    _save_rmsnorm(ctx, x, weight, output[1], weight_offset)


def _fwd_backward(ctx, dy, _drstd):
    return *_rmsnorm_grads(rmsnorm_bwd, ctx, dy), None, None, None


rmsnorm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _residual_setup_context(ctx, inputs, output):
    x, residual, weight, _eps, weight_offset, _llama, _h_dtype = inputs
    _save_residual(ctx, x, residual, weight, output[1], output[2], weight_offset)


def _residual_backward(ctx, dy, dh, _drstd):
    return *_residual_grads(rmsnorm_bwd, ctx, dy, dh), None, None, None, None


rmsnorm_residual_fwd.register_autograd(_residual_backward, setup_context=_residual_setup_context)


# ---- autograd Functions: the eager route ----


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, weight_offset, llama):
        y, _h, rstd = rmsnorm_fwd_launch(x, None, weight, eps, weight_offset, llama, None)
        _save_rmsnorm(ctx, x, weight, rstd, weight_offset)
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_rmsnorm_grads(rmsnorm_bwd_launch, ctx, dy), None, None, None


class _RMSNormResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, weight_offset, llama, h_dtype):
        ctx.set_materialize_grads(False)  # an unused h sends no gradient: skip reading one
        y, h, rstd = rmsnorm_fwd_launch(x, residual, weight, eps, weight_offset, llama, h_dtype)
        _save_residual(ctx, x, residual, weight, h, rstd, weight_offset)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        return *_residual_grads(rmsnorm_bwd_launch, ctx, dy, dh), None, None, None, None


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or (x.device.type == "cpu" and _config.interpret_enabled())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- public API ----


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
    llama = casting == "llama"
    if torch.compiler.is_compiling():
        return rmsnorm_fwd(x, weight, eps, weight_offset, llama)[0]
    if _needs_grad(x, weight):
        return _RMSNormFunction.apply(x, weight, eps, weight_offset, llama)
    return rmsnorm_fwd_launch(x, None, weight, eps, weight_offset, llama, None)[0]


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
    elif torch.compiler.is_compiling():
        y, h, _rstd = rmsnorm_residual_fwd(
            x, residual, weight, eps, weight_offset, casting == "llama", h_dtype
        )
    elif _needs_grad(x, residual, weight):
        y, h = _RMSNormResidualFunction.apply(
            x, residual, weight, eps, weight_offset, casting == "llama", h_dtype
        )
    else:
        y, h, _rstd = rmsnorm_fwd_launch(
            x, residual, weight, eps, weight_offset, casting == "llama", h_dtype
        )
    return (y, h) if return_residual else y
