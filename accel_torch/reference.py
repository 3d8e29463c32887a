"""RMSNorm in plain torch ops: the CPU fallback and the readable statement of the numerics.

The math here also serves the kernels' autograd wherever the kernels cannot: double backward
(the backward recorded for a second derivative), forward mode (jvp) and torch.func
transforms of the backward.
"""

import torch
import torch.autograd.forward_ad as _forward_ad

from .validation import check_flag, check_residual_args, check_rmsnorm_args


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for tensors of dtype: float64 stays float64, the rest is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rstd_of(hf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)


def forward_math(h, weight, eps: float, weight_offset: float, llama: bool, out_dtype):
    """RMSNorm of h (..., N) over the last axis; arguments assumed checked.

    weight: (N,) or None (or any shape broadcasting against h, e.g. (B, 1, N) per sample).
    Returns y (h.shape, out_dtype), rounded once (twice with llama: x*rstd to h's dtype
    first), and rstd (h.shape[:-1], fp32, or float64 for a float64 h). Differentiable by
    autograd (through rsqrt).
    """
    hf = h.to(compute_dtype(h.dtype))
    rstd = _rstd_of(hf, eps)
    if weight is None:
        y = hf * rstd
    else:
        w = weight.to(hf.dtype) + weight_offset
        # x * (rstd * w): one rounding into the subnormal range, not two
        y = (hf * rstd).to(h.dtype).to(hf.dtype) * w if llama else hf * (rstd * w)
    return y.to(out_dtype), rstd.squeeze(-1)


def backward_math(dy, h, weight, rstd, eps: float, weight_offset: float, dh=None):
    """The contract's gradient of y = rmsnorm(h), in torch ops.

    dy, h: (..., N); weight: (N,) or None; rstd: h.shape[:-1] as saved by the forward, or
    None to recompute it from h with autograd (the backward then is itself exactly
    differentiable: double backward). dh: optional gradient reaching h directly.
    Returns (dh_total in fp32 (float64 for a float64 h), dweight in weight's dtype or None).
    """
    hf = h.to(compute_dtype(h.dtype))
    rstd = _rstd_of(hf, eps) if rstd is None else rstd.to(hf.dtype).unsqueeze(-1)
    xhat = hf * rstd
    g = dy.to(hf.dtype)
    gw = g if weight is None else g * (weight.to(hf.dtype) + weight_offset)
    dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(hf.dtype)
    dweight = None
    if weight is not None:
        dweight = (g * xhat).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
    return dx, dweight


def jvp_math(h, weight, rstd, h_t, w_t, weight_offset: float):
    """Tangent of y = rmsnorm(h) (fp32, float64 for a float64 h) for tangents h_t of h and
    w_t of weight (either may be None); rstd as saved by the forward."""
    hf = h.to(compute_dtype(h.dtype))
    rstd = rstd.to(hf.dtype).unsqueeze(-1)
    xhat = hf * rstd
    y_t = torch.zeros_like(hf)
    if h_t is not None:
        ht = h_t.to(hf.dtype)
        y_t = rstd * (ht - xhat * (xhat * ht).mean(-1, keepdim=True))
        if weight is not None:
            y_t = y_t * (weight.to(hf.dtype) + weight_offset)
    if w_t is not None:
        y_t = y_t + xhat * w_t.to(hf.dtype)
    return y_t


def residual_add_math(x: torch.Tensor, residual: torch.Tensor, h_dtype) -> torch.Tensor:
    """h = x + residual in fp32 (float64 if either is float64), rounded once to h_dtype."""
    ct = torch.promote_types(compute_dtype(x.dtype), compute_dtype(residual.dtype))
    return (x.to(ct) + residual.to(ct)).to(h_dtype)


# ---- autograd: the reference's own, and the rules the kernels' Functions share ----


def save_norm_context(ctx, inputs, output, *, eager=True, forward_ad=True):
    """Save what backward and jvp need. inputs: (x, residual or None, weight, eps,
    weight_offset, llama, h_dtype); output: (y, rstd) or (y, h, rstd). eager=False for the
    custom ops' autograd (no forward-mode saves, grads materialized as the compiler wants);
    forward_ad=False where no forward-mode level is active (legacy_form's calls)."""
    x, residual, weight, eps, weight_offset, _llama, _h_dtype = inputs
    h, rstd = (x, output[1]) if residual is None else (output[1], output[2])
    ctx.save_for_backward(h, weight, rstd)
    if eager:
        ctx.mark_non_differentiable(rstd)
        ctx.set_materialize_grads(False)  # an unused h sends no gradient: skip reading one
        if forward_ad:
            ctx.save_for_forward(h, weight, rstd)
    ctx.eps, ctx.weight_offset = eps, weight_offset
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _math_wanted(h) -> bool:
    """The backward must be torch ops: recorded for a second derivative, run under a
    torch.func transform, or float64 (which the kernels do not compute)."""
    return (
        torch.is_grad_enabled()
        or torch._C._are_functorch_transforms_active()
        or h.dtype == torch.float64
    )


def norm_grads(ctx, dy, dh, bwd=None, weight_index=2):
    """(dx, dresidual, dweight) of y = rmsnorm(x) (dresidual None) or of the fused
    y, h = fused(x, residual) (d residual = d x, each rounded from fp32 to its dtype).

    bwd: the kernel backward (launch.rmsnorm_bwd_launch, or the custom op), used unless
    _math_wanted; None: always the torch ops. weight_index: weight's position in the inputs.
    """
    h, weight, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[weight_index]
    if dy is None:  # only h was used: its gradient passes through the add unchanged
        if dh is None:
            return None, None, None
        return dh.to(ctx.x_dtype), dh.to(ctx.residual_dtype), None
    if bwd is not None and not _math_wanted(h):
        res_dtype = ctx.residual_dtype
        dres_dtype = res_dtype if res_dtype is not None and res_dtype != dy.dtype else None
        dx, dres, dweight = bwd(dy, h, weight, rstd, dh, ctx.weight_offset, dres_dtype)
        if ctx.has_residual and dres_dtype is None:
            dres = dx  # same values and dtype; autograd lets one tensor feed two inputs
        elif not ctx.has_residual:
            dres = None
        return dx, dres, dweight if need_w else None
    recompute = torch.is_grad_enabled() or h.dtype == torch.float64
    d, dweight = backward_math(
        dy, h, weight, None if recompute else rstd, ctx.eps, ctx.weight_offset, dh
    )
    dres = d.to(ctx.residual_dtype) if ctx.has_residual else None
    return d.to(ctx.x_dtype), dres, dweight if need_w else None


def norm_jvp(ctx, x_t, r_t, w_t):
    """Output tangents ((y_t, rstd_t) or (y_t, h_t, rstd_t)) for tangents of x, residual
    and weight; h_t = x_t + r_t, rounded like h."""
    h, weight, rstd = ctx.saved_tensors  # in jvp: what save_for_forward kept
    if not ctx.has_residual:
        return jvp_math(h, weight, rstd, x_t, w_t, ctx.weight_offset).to(ctx.x_dtype), None
    ct = compute_dtype(h.dtype)
    parts = [t.to(ct) for t in (x_t, r_t) if t is not None]
    h_t = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
    y_t = jvp_math(h, weight, rstd, h_t, w_t, ctx.weight_offset).to(ctx.x_dtype)
    return y_t, (h_t if h_t is not None else torch.zeros_like(h)).to(h.dtype), None


class CompiledNormFunction(torch.autograd.Function):
    """y = rmsnorm(x) (residual None) or y, h = fused(x, residual) in torch ops, with the
    contract's gradient (autograd through rsqrt would form rstd**3, which under- or
    overflows fp32 at |x| ~ 1e15). The form torch.compile traces (it takes no jvp rule).

    apply(x, residual, weight, eps, weight_offset, llama, h_dtype) -> (y, rstd) or
    (y, h, rstd); rstd (x.shape[:-1]) is non-differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, residual, weight, eps, weight_offset, llama, h_dtype):
        if residual is None:
            return forward_math(x, weight, eps, weight_offset, llama, x.dtype)
        h = residual_add_math(x, residual, h_dtype)
        y, rstd = forward_math(h, weight, eps, weight_offset, llama, x.dtype)
        return y, h, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_norm_context(ctx, inputs, output, eager=False)

    @staticmethod
    def backward(ctx, dy, *rest):
        dh = rest[0] if ctx.has_residual else None
        return *norm_grads(ctx, dy, dh), None, None, None, None


class NormFunction(CompiledNormFunction):
    """CompiledNormFunction for eager use: also a jvp rule (forward mode), and a vmap rule
    generated by torch.func."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_norm_context(ctx, inputs, output)

    @staticmethod
    def jvp(ctx, x_t, r_t, w_t, *_):
        return norm_jvp(ctx, x_t, r_t, w_t)


def transformed() -> bool:
    """A torch.func transform or forward-mode AD is active: they need the setup_context form
    (and its jvp / vmap rules); plain autograd takes the cheaper legacy_form."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def legacy_form(fn):
    """fn, a NormFunction, in the legacy ``forward(ctx, ...)`` form: the same
    forward, saves and backward, but its apply skips the signature binding (inspect) that the
    setup_context form pays on every call (about half of an eager forward+backward's host
    time). For calls where transformed() is False."""

    def forward(ctx, *inputs):
        out = fn.forward(*inputs)
        save_norm_context(ctx, inputs, out, forward_ad=False)  # fn's setup, less jvp's saves
        return out

    body = {"forward": staticmethod(forward), "backward": staticmethod(fn.backward)}
    return type(f"Legacy{fn.__name__}", (torch.autograd.Function,), body)


_LegacyNormFunction = legacy_form(NormFunction)


def reference_norm(x, residual, weight, eps, weight_offset, llama, h_dtype):
    """(y, h) of the fused op (h None without a residual) in torch ops; arguments checked."""
    tensors = (x, residual, weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if torch.compiler.is_compiling():
            cls = CompiledNormFunction
        else:
            cls = NormFunction if transformed() else _LegacyNormFunction
        out = cls.apply(x, residual, weight, eps, weight_offset, llama, h_dtype)
    else:  # plain ops: forward mode and vmap need no rule
        out = NormFunction.forward(x, residual, weight, eps, weight_offset, llama, h_dtype)
    return out[0], (out[1] if residual is not None else None)


def rmsnorm_torch(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32"):
    """RMSNorm over the last axis in plain torch ops (any device, differentiable).

    Args:
        x: (..., N) floating tensor (float64 is computed in float64, the rest in fp32).
        weight: optional (N,) floating tensor, any float dtype.
        eps: added to the mean square before the reciprocal square root.
        weight_offset: added to weight in fp32 (1.0 gives Gemma's ``1 + weight``).
        casting: "fp32" (one rounding) or "llama" (round x*rstd to x's dtype before the weight).
    Returns:
        (..., N) tensor of x's dtype.
    """
    eps, weight_offset = check_rmsnorm_args(x, weight, eps, weight_offset, casting)
    return reference_norm(x, None, weight, eps, weight_offset, casting == "llama", None)[0]


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
    check_flag("return_residual", return_residual)
    y, h = reference_norm(x, residual, weight, eps, weight_offset, casting == "llama", h_dtype)
    return (y, h) if return_residual else y
