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

Tensor subclasses that dispatch (DTensor, FakeTensor) always take the custom ops, whose
sharding and fake rules they need; the ops run the reference math where the kernels cannot
(float64, a device without kernels). The reference math (reference.py) also serves float64
everywhere, double backward and forward mode.
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
from .reference import (
    NormFunction,
    backward_math,
    forward_math,
    legacy_form,
    norm_grads,
    reference_norm,
    residual_add_math,
    save_norm_context,
    transformed,
)
from .validation import check_flag, check_residual_args, check_rmsnorm_args

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # types the eager routes take as they are
_F64 = torch.float64


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or (x.device.type == "cpu" and _config.interpret_enabled())


# ---- custom ops: the torch.compile route ----


@torch.library.custom_op("accel_torch::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float, llama: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward. x: (..., N); weight: (N,) or None. Returns y (x.shape, x.dtype) and
    rstd (x.shape[:-1], float32)."""
    if not _use_kernels(x) or x.dtype == _F64:
        y, rstd = forward_math(x, weight, eps, weight_offset, llama, x.dtype)
        return y, rstd.float()
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
    if not _use_kernels(x) or _F64 in (x.dtype, residual.dtype, h_dtype):
        h = residual_add_math(x, residual, h_dtype)
        y, rstd = forward_math(h, weight, eps, weight_offset, llama, x.dtype)
        return y, h, rstd.float()
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
    if not _use_kernels(x):
        d, dweight = backward_math(dy, x, weight, rstd, 0.0, weight_offset, dh)
        dres = d.to(dres_dtype) if dres_dtype is not None else None
        return absent_as_empty(dy, (d.to(dy.dtype), dres, dweight))
    return absent_as_empty(
        dy, rmsnorm_bwd_launch(dy, x, weight, rstd, dh, weight_offset, dres_dtype)
    )


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd, dh, weight_offset, dres_dtype):
    return absent_as_empty(dy, empty_bwd_outputs(dy, x, weight, dres_dtype))


# ---- autograd of the custom ops (the compiler's route) ----


def _fwd_setup_context(ctx, inputs, output):
    x, weight, eps, weight_offset, llama = inputs
    save_norm_context(ctx, (x, None, weight, eps, weight_offset, llama, None), output, eager=False)


def _fwd_backward(ctx, dy, _drstd):
    dx, _dres, dweight = norm_grads(ctx, dy, None, rmsnorm_bwd, weight_index=1)
    return dx, dweight, None, None, None


rmsnorm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _residual_setup_context(ctx, inputs, output):
    save_norm_context(ctx, inputs, output, eager=False)


def _residual_backward(ctx, dy, dh, _drstd):
    return *norm_grads(ctx, dy, dh, rmsnorm_bwd), None, None, None, None


rmsnorm_residual_fwd.register_autograd(_residual_backward, setup_context=_residual_setup_context)


# ---- the eager route: an autograd Function around the launchers ----


def _batch_first(t, dim, size):
    """t with its vmap batch dimension first (broadcast to size if t has none)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


class _KernelFunction(NormFunction):
    """NormFunction with the kernels: forward and (first-order) backward launch them; the
    reference's torch ops take over where norm_grads says. vmap folds the batch dimension
    into rows; a batched weight (one per sample) runs the reference math, batched."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x, residual, weight, eps, weight_offset, llama, h_dtype):
        y, h, rstd = rmsnorm_fwd_launch(x, residual, weight, eps, weight_offset, llama, h_dtype)
        return (y, rstd) if residual is None else (y, h, rstd)

    @staticmethod
    def backward(ctx, dy, *rest):
        dh = rest[0] if ctx.has_residual else None
        return *norm_grads(ctx, dy, dh, rmsnorm_bwd_launch), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, residual, weight, eps, weight_offset, llama, h_dtype):
        size = info.batch_size
        x, residual = _batch_first(x, in_dims[0], size), _batch_first(residual, in_dims[1], size)
        if in_dims[2] is None:
            out = _KernelFunction.apply(x, residual, weight, eps, weight_offset, llama, h_dtype)
        else:
            w = weight.movedim(in_dims[2], 0)
            w = w.reshape(size, *[1] * (x.dim() - 2), w.shape[-1])
            h = x if residual is None else residual_add_math(x, residual, h_dtype)
            y, rstd = forward_math(h, w, eps, weight_offset, llama, x.dtype)
            out = (y, rstd) if residual is None else (y, h, rstd)
        return out, (0,) * len(out)


_EagerKernelFunction = legacy_form(_KernelFunction)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- public API ----


def rmsnorm(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32"):
    """RMSNorm over the last axis: ``y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    Args:
        x: (..., N) tensor, float32 / float16 / bfloat16 (kernels), or float64 (computed in
            float64 by the reference math); any leading shape, 0 rows allowed. A last
            dimension with stride 1 is read in place (rows may be strided).
        weight: optional (N,) floating tensor (its dtype may differ from x's; any strides).
        eps: >= 0 (a Python or NumPy real), added to the mean square.
        weight_offset: added to weight in fp32 (1.0 for Gemma's ``1 + weight``).
        casting: "fp32" (default): y rounded once from fp32; "llama": x*rstd rounded to x's
            dtype before the weight, as Hugging Face's LlamaRMSNorm.
    Returns:
        (..., N) tensor of x's dtype. Differentiable in x and weight, to any order, in
        reverse and forward mode, and under torch.func transforms (grad, vjp, jvp, vmap).

    CUDA tensors run the Triton kernels; other devices the same math in torch ops
    (``rmsnorm_torch``), or the kernels in Triton's interpreter with ``ACCEL_INTERPRET=1``.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    llama = casting == "llama"
    if type(x) not in _PLAIN:  # DTensor, FakeTensor: the custom op and its rules
        return rmsnorm_fwd(x, weight, eps, weight_offset, llama)[0]
    if not _use_kernels(x) or x.dtype is _F64:
        return reference_norm(x, None, weight, eps, weight_offset, llama, None)[0]
    if torch.compiler.is_compiling():
        return rmsnorm_fwd(x, weight, eps, weight_offset, llama)[0]
    if transformed():
        return _KernelFunction.apply(x, None, weight, eps, weight_offset, llama, None)[0]
    if _needs_grad(x, weight):
        return _EagerKernelFunction.apply(x, None, weight, eps, weight_offset, llama, None)[0]
    return rmsnorm_fwd_launch(x, None, weight, eps, weight_offset, llama, None, False)[0]


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
        x, residual: (..., N) floating tensors of the same shape and device (float64 in
            any of x, residual, residual_dtype: the reference math, in float64).
        weight, eps, weight_offset, casting: as in :func:`rmsnorm`.
        return_residual: bool, also return h (the new residual stream).
        residual_dtype: dtype of h (default x's dtype), e.g. torch.float32 for an fp32
            residual stream.
    Returns:
        y of x's dtype, or ``(y, h)`` with ``return_residual=True``. Gradients flow to x,
        residual and weight; d residual = d x, rounded from fp32 to each one's dtype.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    h_dtype = check_residual_args(x, residual, residual_dtype)
    check_flag("return_residual", return_residual)
    llama = casting == "llama"
    args = (x, residual, weight, eps, weight_offset, llama, h_dtype)
    if type(x) not in _PLAIN:
        y, h, _rstd = rmsnorm_residual_fwd(*args)
    elif not _use_kernels(x) or _F64 is x.dtype or _F64 is residual.dtype or _F64 is h_dtype:
        y, h = reference_norm(*args)
    elif torch.compiler.is_compiling():
        y, h, _rstd = rmsnorm_residual_fwd(*args)
    elif transformed():
        y, h, _rstd = _KernelFunction.apply(*args)
    elif _needs_grad(x, residual, weight):
        y, h, _rstd = _EagerKernelFunction.apply(*args)
    else:
        y, h, _rstd = rmsnorm_fwd_launch(*args, False)
    return (y, h) if return_residual else y
