"""The float64 reference, written once and used for both halves.

Forward and gradients come from torch float64 autograd on the already-rounded inputs, so the
only error left in a kernel's result is its own. The fused sum h is the contract's
``round(h_dtype, x.f32 + r.f32)`` exactly (it is part of the semantics, not an
approximation); its rounding is transparent to the gradient, like every rounding in the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import Case, Inputs

F32_MAX = torch.finfo(torch.float32).max


@dataclass
class Reference:
    """Float64 results of one case.

    ``y``: (..., N) output before rounding; ``h``: the fused sum (exact value of h_dtype) or
    None; ``dx``, ``dresidual``: (..., N); ``dweight``: (N,) or None. Gradients are None when
    the case does not check them. ``overflow_rows``: bool (rows,) where the fp32 sum of
    squares overflows, whose expected output is PyTorch's (see :func:`reference`).
    ``dx_scale``: (..., N), the size of the terms that dx (and dresidual) is the difference
    of, ``|rstd * g| + |rstd * xhat * mean(g * xhat)|`` (+ ``|dh|`` when h is returned): the
    scale an fp32 evaluation's error is relative to. Where the terms cancel (N = 1: dx =
    w * eps / (x**2 + eps)**1.5, all but nothing of rstd * g) no fp32 evaluation of the
    contract's formula is accurate relative to dx itself, only relative to its terms.
    """

    y: torch.Tensor
    h: torch.Tensor | None
    dx: torch.Tensor | None
    dresidual: torch.Tensor | None
    dweight: torch.Tensor | None
    overflow_rows: torch.Tensor
    dx_scale: torch.Tensor | None = None


def fused_sum(x: torch.Tensor, residual: torch.Tensor, h_dtype: torch.dtype) -> torch.Tensor:
    """The contract's h: x and residual added in fp32, rounded once to ``h_dtype``."""
    return (x.float() + residual.float()).to(h_dtype)


def reference(case: Case, inp: Inputs) -> Reference:
    """Float64 forward and (when ``case.grads``) gradients of ``case`` on ``inp``."""
    want_grads = case.grads
    x64 = inp.x.detach().double().requires_grad_(want_grads)
    leaves = [x64]
    if case.fused:
        r64 = inp.residual.detach().double().requires_grad_(want_grads)
        leaves.append(r64)
        exact = fused_sum(inp.x, inp.residual, case.h_dtype).double()
        s = x64 + r64
        h64 = s + (exact - s).detach()  # value of the rounded h, gradient of x + r
        src = h64
    else:
        h64 = None
        src = x64
    w64 = None
    if inp.weight is not None:
        w64 = inp.weight.detach().double().requires_grad_(want_grads)
        leaves.append(w64)
        w_eff = w64 + case.weight_offset
    else:
        w_eff = 1.0
    ss = (src * src).sum(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(ss / case.n + case.eps)
    y64 = src * rstd * w_eff

    # A row whose fp32 sum of squares overflows: the contract's fp32 statistics give
    # rstd = 1/sqrt(inf) = 0, and PyTorch's own rms_norm gives the same, so PyTorch is the
    # reference for that row (zeros), not the float64 value.
    overflow = (ss.squeeze(-1) > F32_MAX).reshape(-1)
    if bool(overflow.any()):
        norm_in = (h64 if case.fused else x64).detach().float()
        w_t = None if inp.weight is None else inp.weight.float() + case.weight_offset
        torch_y = torch.nn.functional.rms_norm(norm_in, (case.n,), w_t, case.eps).double()
        flat = y64.detach().reshape(-1, case.n).clone()
        flat[overflow] = torch_y.reshape(-1, case.n)[overflow]
        y_ref = flat.reshape(y64.shape)
    else:
        y_ref = y64.detach()

    dx = dr = dw = dx_scale = None
    if want_grads:
        with torch.no_grad():
            g = inp.dy.double() * w_eff
            xhat = src * rstd
            c = (g * xhat).mean(-1, keepdim=True)
            dx_scale = (rstd * g).abs() + (rstd * xhat * c).abs()
            if case.fused and case.return_residual:
                dx_scale = dx_scale + inp.dh.double().abs()
        outs, cots = [y64], [inp.dy.double()]
        if case.fused and case.return_residual:
            outs.append(h64)
            cots.append(inp.dh.double())
        grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
        grads = [
            torch.zeros_like(lf) if gr is None else gr for gr, lf in zip(grads, leaves, strict=True)
        ]
        dx = grads[0]
        if case.fused:
            dr = grads[1]
        if w64 is not None:
            dw = grads[-1]
    return Reference(
        y=y_ref,
        h=None if h64 is None else h64.detach(),
        dx=dx,
        dresidual=dr,
        dweight=dw,
        overflow_rows=overflow,
        dx_scale=dx_scale,
    )


# Relative error allowed in the kernels' fp32 xhat before its llama rounding: the sum of
# squares in fp32 over N <= 131072 in blocked/tree order is off by <= (log2 N + blocks) *
# 2**-24 ~ 2**-18.5 at the sizes here, rsqrt by ~2 ulps. Only an xhat that close to a
# rounding midpoint of its dtype may round either way.
LLAMA_XHAT_REL = 2.0**-18


def llama_interval(case: Case, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's "llama" result, allowing for the fp32 statistics' own rounding.

    ``y = round_out(round_h(xhat).f32 * w)`` with ``xhat`` anywhere within LLAMA_XHAT_REL of
    its exact value: at most two candidates per element (one unless xhat sits next to a
    rounding midpoint). Returns (lo, hi), x's dtype, shape of x. Two correct
    implementations - or one and Hugging Face's - can round xhat differently there, and the
    weight can then carry that one step of xhat to two steps of y: "within 1 ulp of HF" is
    not attainable, this interval is (and is bit-exact everywhere else).
    """
    src = fused_sum(inp.x, inp.residual, case.h_dtype) if case.fused else inp.x
    s64 = src.double()
    rstd = 1.0 / torch.sqrt((s64 * s64).mean(-1, keepdim=True) + case.eps)
    xhat = s64 * rstd
    overflow = ((s64 * s64).sum(-1, keepdim=True) > F32_MAX).expand_as(xhat)
    xhat = torch.where(overflow, torch.zeros_like(xhat), xhat)  # PyTorch's zeros, see above
    ends = []
    for f in (1.0 - LLAMA_XHAT_REL, 1.0 + LLAMA_XHAT_REL):
        xr = (xhat * f).float().to(src.dtype).float()  # fp32 xhat, then its rounding
        if inp.weight is not None:
            xr = xr * (inp.weight.float() + case.weight_offset)
        ends.append(xr.to(inp.x.dtype))
    return torch.minimum(*ends), torch.maximum(*ends)


def llama_expected(case: Case, inp: Inputs) -> torch.Tensor:
    """Hugging Face ``LlamaRMSNorm`` semantics on the case's inputs, in x's dtype.

    ``hidden.float()``, ``variance = pow(2).mean``, ``hidden * rsqrt(variance + eps)``,
    rounded to the normalized tensor's dtype, times the weight, rounded to x's dtype. Where
    HF's module applies as is (weight in x's dtype, no offset, not fused) it is used itself;
    elsewhere the same steps are spelled out, with ``weight.float() + weight_offset`` as
    the weight (Gemma's form) and h as the normalized tensor.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    src = fused_sum(inp.x, inp.residual, case.h_dtype) if case.fused else inp.x
    w = inp.weight
    plain = (
        not case.fused and w is not None and w.dtype == inp.x.dtype and case.weight_offset == 0.0
    )
    if plain:
        mod = LlamaRMSNorm(case.n, eps=case.eps).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.weight.copy_(w)
            return mod(src)
    return llama_steps(src, w, case.eps, case.weight_offset, inp.x.dtype)


def llama_steps(
    src: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The steps of ``LlamaRMSNorm.forward`` with an fp32 weight ``weight + offset``."""
    hidden = src.float()
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    xr = hidden.to(src.dtype)
    if weight is None:
        return xr.to(out_dtype)
    return ((weight.float() + weight_offset) * xr.float()).to(out_dtype)
