"""Plain jax.numpy RMSNorm with the kernels' numerics: the CPU path and the reference.

All statistics are fp32: ``rstd = 1 / sqrt(sum(x*x)/N + eps)``, ``w = weight + weight_offset``;
when any input (or the output / h dtype) is float64, all of it is computed in float64 instead.
"fp32" casting rounds once to the output dtype; "llama" rounds ``x * rstd`` to the input dtype
first (Hugging Face ``LlamaRMSNorm``). Fused: ``h = round_to(h_dtype, x + residual)`` then the
same normalization of h.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
F64 = jnp.dtype(jnp.float64)


def _row_sum(a, n: int, axis_name):
    """(sum over the last axis, N): of the whole row when axis_name names the (shard_map /
    vmap) axes the hidden axis is split over, else of this array's row."""
    total = jnp.sum(a, axis=-1)
    if axis_name is None:
        return total, n
    return jax.lax.psum(total, axis_name), n * jax.lax.psum(1, axis_name)


def compute_dtype(*dtypes):
    """float64 if any of dtypes (None ignored) is float64, else float32: the statistics'."""
    return F64 if any(d is not None and jnp.dtype(d) == F64 for d in dtypes) else jnp.dtype(F32)


def _dtype(a):
    return None if a is None else a.dtype


def reference_fwd(
    x,
    residual,
    weight,
    *,
    eps,
    weight_offset,
    llama,
    out_dtype,
    round_dtype,
    need_h,
    axis_name=None,
):
    """Forward on (..., N) arrays; returns (y out_dtype, h round_dtype or None, rstd fp32 (...,)).

    round_dtype is the dtype of h (fused) and of the llama intermediate rounding. Computed in
    float32, or float64 (rstd too) when any input or output dtype is float64. axis_name: the
    named axes the hidden axis is split over (statistics of whole rows), or None.
    """
    acc = compute_dtype(x.dtype, _dtype(residual), _dtype(weight), out_dtype, round_dtype)
    xf = x.astype(acc)
    h = None
    if residual is not None:
        h = (xf + residual.astype(acc)).astype(round_dtype)
        xf = h.astype(acc)
    ss, n = _row_sum(xf * xf, x.shape[-1], axis_name)
    rstd = 1.0 / jnp.sqrt(ss / n + eps)
    r = rstd[..., None]
    if weight is None:
        y = xf * r
    else:
        w = weight.astype(acc)
        if weight_offset:
            w = w + weight_offset
        if llama:
            y = (xf * r).astype(round_dtype).astype(acc) * w
        else:
            y = xf * (r * w)  # one rounding into the subnormal range, as the kernels
    return y.astype(out_dtype), (h if need_h else None), rstd


def reference_bwd(dy, x, rstd, weight, dh, *, weight_offset, dx_dtype, dres_dtype, axis_name=None):
    """Backward on (..., N) arrays (rstd (...,)), the kernels' formulas; returns
    (dx, dres or None, dweight or None).

    g = dy * w; dx = rstd * (g - xhat * mean(g * xhat)) (+ dh); dweight = sum_rows(dy * xhat).
    In rstd's dtype (float32, or float64 when the forward was computed in float64).
    axis_name: as in reference_fwd (the row means over the whole row; dweight stays local).
    """
    acc = rstd.dtype
    r = rstd[..., None]
    xhat = x.astype(acc) * r
    dyf = dy.astype(acc)
    g = dyf
    if weight is not None:
        w = weight.astype(acc)
        if weight_offset:
            w = w + weight_offset
        g = dyf * w
    gx, n = _row_sum(g * xhat, x.shape[-1], axis_name)
    dx = r * (g - xhat * (gx / n)[..., None])
    if dh is not None:
        dx = dx + dh.astype(acc)
    dres = dx.astype(dres_dtype) if dres_dtype is not None else None
    dweight = None
    if weight is not None:
        rows = tuple(range(x.ndim - 1))
        dweight = jnp.sum(dyf * xhat, axis=rows).astype(weight.dtype)
    return dx.astype(dx_dtype), dres, dweight


def rmsnorm_fwd(x, residual, weight, *, store_h, store_rstd, interpret=False, **args):
    """reference_fwd with the kernels' signature (``kernels.rmsnorm_fwd``), for the shapes
    no available kernel serves; args: reference_fwd's static ones (eps, weight_offset,
    llama, out_dtype, round_dtype); interpret is ignored. x: (M, N). Returns (y, h or None,
    rstd (M,) or None)."""
    del interpret
    y, h, rstd = reference_fwd(x, residual, weight, need_h=store_h and residual is not None, **args)
    return y, h, (rstd if store_rstd else None)


def rmsnorm_bwd(dy, x, rstd, weight, dh, *, interpret=False, **args):
    """reference_bwd with the kernels' signature (``kernels.rmsnorm_bwd``), for the shapes no
    available kernel serves; args: weight_offset, dx_dtype, dres_dtype; interpret is
    ignored. Returns (dx, dres or None, dweight or None)."""
    del interpret
    return reference_bwd(dy, x, rstd, weight, dh, **args)


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
