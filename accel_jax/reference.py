"""Plain jax.numpy RMSNorm with the kernels' numerics: the CPU path and the reference.

All statistics are fp32: ``rstd = 1 / sqrt(sum(x*x)/N + eps)``, ``w = weight + weight_offset``.
"fp32" casting rounds once to the output dtype; "llama" rounds ``x * rstd`` to the input dtype
first (Hugging Face ``LlamaRMSNorm``). Fused: ``h = round_to(h_dtype, x + residual)`` then the
same normalization of h.
"""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32


def reference_fwd(
    x, residual, weight, *, eps, weight_offset, llama, out_dtype, round_dtype, need_h
):
    """Forward on (..., N) arrays; returns (y out_dtype, h round_dtype or None, rstd fp32 (...,)).

    round_dtype is the dtype of h (fused) and of the llama intermediate rounding.
    """
    xf = x.astype(F32)
    h = None
    if residual is not None:
        h = (xf + residual.astype(F32)).astype(round_dtype)
        xf = h.astype(F32)
    n = x.shape[-1]
    rstd = 1.0 / jnp.sqrt(jnp.sum(xf * xf, axis=-1) / n + eps)
    r = rstd[..., None]
    if weight is None:
        y = xf * r
    else:
        w = weight.astype(F32)
        if weight_offset:
            w = w + weight_offset
        if llama:
            y = (xf * r).astype(round_dtype).astype(F32) * w
        else:
            y = xf * (r * w)  # one rounding into the subnormal range, as the kernels
    return y.astype(out_dtype), (h if need_h else None), rstd


def reference_bwd(dy, x, rstd, weight, dh, *, weight_offset, dx_dtype, dres_dtype):
    """Backward on (M, N) arrays, the kernels' formulas; returns (dx, dres or None, dweight).

    g = dy * w; dx = rstd * (g - xhat * mean(g * xhat)) (+ dh); dweight = sum_rows(dy * xhat).
    """
    n = x.shape[-1]
    xhat = x.astype(F32) * rstd[:, None]
    dyf = dy.astype(F32)
    g = dyf
    if weight is not None:
        w = weight.astype(F32)
        if weight_offset:
            w = w + weight_offset
        g = dyf * w
    dx = rstd[:, None] * (g - xhat * (jnp.sum(g * xhat, axis=-1, keepdims=True) / n))
    if dh is not None:
        dx = dx + dh.astype(F32)
    dres = dx.astype(dres_dtype) if dres_dtype is not None else None
    dweight = None
    if weight is not None:
        dweight = jnp.sum(dyf * xhat, axis=0).astype(weight.dtype)
    return dx.astype(dx_dtype), dres, dweight


def rmsnorm_reference(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32"):
    """RMSNorm in plain jnp (differentiable by JAX autodiff).

    x: (..., N) float array; weight: None or (N,) any float dtype. Returns y, x's dtype.
    """
    y, _, _ = reference_fwd(
        x,
        None,
        weight,
        eps=eps,
        weight_offset=weight_offset,
        llama=casting == "llama",
        out_dtype=x.dtype,
        round_dtype=x.dtype,
        need_h=False,
    )
    return y


def rmsnorm_residual_reference(
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
    """Fused residual-add RMSNorm in plain jnp.

    x, residual: (..., N). h = round(residual_dtype or x.dtype, x + residual); y = rmsnorm(h)
    in x's dtype. Returns y, or (y, h) with return_residual.
    """
    h_dtype = jnp.dtype(residual_dtype) if residual_dtype is not None else x.dtype
    y, h, _ = reference_fwd(
        x,
        residual,
        weight,
        eps=eps,
        weight_offset=weight_offset,
        llama=casting == "llama",
        out_dtype=x.dtype,
        round_dtype=h_dtype,
        need_h=True,
    )
    return (y, h) if return_residual else y
