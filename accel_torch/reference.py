"""RMSNorm in plain torch ops: the CPU fallback and the readable statement of the numerics."""

import torch

from .validation import check_residual_args, check_rmsnorm_args


def _forward_math(h, weight, eps, weight_offset, casting, out_dtype):
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return (hf * rstd).to(out_dtype), rstd
    w = weight.float() + weight_offset
    if casting == "llama":
        return ((hf * rstd).to(h.dtype).float() * w).to(out_dtype), rstd
    return (hf * (rstd * w)).to(out_dtype), rstd  # one rounding into the subnormal range


class _NormalizeFunction(torch.autograd.Function):
    """The contract's gradient in torch ops. Autograd through rsqrt instead would form
    rstd**3, which under- or overflows fp32 at extreme magnitudes (|x| ~ 1e15)."""

    @staticmethod
    def forward(ctx, h, weight, eps, weight_offset, casting, out_dtype):
        y, rstd = _forward_math(h, weight, eps, weight_offset, casting, out_dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.weight_offset = weight_offset
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, rstd = ctx.saved_tensors
        xhat = h.float() * rstd
        g = dy.float()
        if weight is not None:
            g = g * (weight.float() + ctx.weight_offset)
        dh = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dy.float() * xhat).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
        return dh.to(h.dtype), dweight, None, None, None, None


def normalize_math(
    h: torch.Tensor, weight, eps: float, weight_offset: float, casting: str, out_dtype
):
    """RMSNorm of h (..., N) over the last axis, in torch ops, rounded once to out_dtype
    (twice with casting="llama"); differentiable in h and weight. Arguments are assumed
    checked."""
    if torch.is_grad_enabled() and (
        h.requires_grad or (weight is not None and weight.requires_grad)
    ):
        return _NormalizeFunction.apply(h, weight, eps, weight_offset, casting, out_dtype)
    return _forward_math(h, weight, eps, weight_offset, casting, out_dtype)[0]


def residual_add_math(x: torch.Tensor, residual: torch.Tensor, h_dtype) -> torch.Tensor:
    """h = x + residual in fp32, rounded once to h_dtype."""
    return (x.float() + residual.float()).to(h_dtype)


def rmsnorm_torch(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32"):
    """RMSNorm over the last axis in plain torch ops (any device, differentiable).

    Args:
        x: (..., N) floating tensor.
        weight: optional (N,) floating tensor, any float dtype.
        eps: added to the mean square before the reciprocal square root.
        weight_offset: added to weight in fp32 (1.0 gives Gemma's ``1 + weight``).
        casting: "fp32" (one rounding) or "llama" (round x*rstd to x's dtype before the weight).
    Returns:
        (..., N) tensor of x's dtype.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    return normalize_math(x, weight, eps, weight_offset, casting, x.dtype)


def rmsnorm_residual_torch(
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
    """``h = round(residual_dtype or x.dtype, x + residual)``, then ``rmsnorm(h)``, in plain torch.

    Args:
        x, residual: (..., N) floating tensors of one shape.
        residual_dtype: dtype h is rounded to and returned in (default x's dtype).
    Returns:
        y (x's dtype), or (y, h) with ``return_residual=True``.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    h_dtype = check_residual_args(x, residual, residual_dtype)
    h = residual_add_math(x, residual, h_dtype)
    y = normalize_math(h, weight, eps, weight_offset, casting, x.dtype)
    return (y, h) if return_residual else y
