"""Float64 references and error bounds for the accel_jax tests (numpy, no JAX math).

Bounds (the contract's):
* outputs, 16-bit dtypes: within 1 ulp of the output dtype at the float64 reference;
* outputs, fp32: within 1e-5 relative (plus one fp32 ulp, for zeros and subnormals);
* gradients (computed in fp32, rounded once): 16-bit within 1 ulp of their dtype at the row's
  largest |reference| (the tensor's for dweight); fp32 within 1e-5 of that largest value.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

F64 = np.float64
# significand bits (with the implicit one), smallest normal exponent
_FORMATS = {
    np.dtype(np.float32): (24, -126),
    np.dtype(np.float16): (11, -14),
    np.dtype(ml_dtypes.bfloat16): (8, -126),
}
DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def rand(key: int, shape, dtype, scale=1.0, shift=0.0):
    """Normal(shift, scale) values rounded to dtype (a jax array)."""
    x = jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale + shift
    return x.astype(dtype)


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32), dtype=F64)


def round_to(a64: np.ndarray, dtype) -> np.ndarray:
    """float64 values rounded (to nearest even) to dtype, returned as float64."""
    return np.asarray(np.asarray(a64).astype(np.dtype(jnp.dtype(dtype))), dtype=F64)


def spacing(ref: np.ndarray, dtype) -> np.ndarray:
    """ulp of dtype at each |ref| (smallest subnormal spacing at 0 and below normals)."""
    p, emin = _FORMATS[np.dtype(jnp.dtype(dtype))]
    a = np.abs(np.where(np.isfinite(ref), ref, 0.0))
    _, e = np.frexp(a)
    exp = np.maximum(e - 1, emin)
    return np.ldexp(1.0, exp - (p - 1))


def is_16bit(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 2


def assert_output_close(out, ref64: np.ndarray, dtype=None, what="y"):
    """Contract bound for outputs: 1 ulp (16-bit) or 1e-5 relative (fp32); NaN must match."""
    dtype = jnp.dtype(out.dtype) if dtype is None else jnp.dtype(dtype)
    o = f64(out)
    assert o.shape == ref64.shape, (what, o.shape, ref64.shape)
    nan_o, nan_r = np.isnan(o), np.isnan(ref64)
    assert np.array_equal(nan_o, nan_r), f"{what}: NaN positions differ"
    o, r = np.where(nan_o, 0.0, o), np.where(nan_r, 0.0, ref64)
    err = np.abs(o - r)
    if is_16bit(dtype):
        bound = spacing(r, dtype)
    else:
        bound = 1e-5 * np.abs(r) + spacing(r, dtype)
    worst = np.max(err / bound) if err.size else 0.0
    assert np.all(err <= bound), f"{what} ({dtype}): worst error {worst:.3f} of the bound"


def assert_grad_close(out, ref64: np.ndarray, cond=None, per_row=True, what="grad"):
    """Gradient bound: 1 ulp (16-bit) / 1e-5 (fp32) of the row's (tensor's) max |reference|.

    cond: the size of the terms the fp32 arithmetic combines (from bwd64), per row or per
    tensor. Where they cancel (dx at N = 1 is ~eps-sized, from terms of size rstd*|g|), fp32
    arithmetic is only accurate relative to them, so 1e-5 * cond is added to the bound; for
    ordinary rows cond is of the size of the result and this changes nothing material.
    """
    dtype = jnp.dtype(out.dtype)
    o = f64(out)
    assert o.shape == ref64.shape, (what, o.shape, ref64.shape)
    if o.size == 0:
        return
    if per_row:
        scale = np.max(np.abs(ref64), axis=-1, keepdims=True)
    else:
        scale = np.max(np.abs(ref64))
    bound = spacing(scale, dtype) if is_16bit(dtype) else 1e-5 * scale + spacing(scale, dtype)
    if cond is not None:
        bound = bound + 1e-5 * cond
    err = np.abs(o - ref64)
    worst = np.max(err / bound)
    assert np.all(err <= bound), f"{what} ({dtype}): worst error {worst:.3f} of the bound"


def fwd64(
    x, residual=None, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32", round_dtype=None
):
    """Float64 forward from the rounded inputs: returns (y64 before output rounding, h64, rstd64).

    "llama": x*rstd is rounded to round_dtype (h's / x's dtype) before the weight, as Hugging
    Face's LlamaRMSNorm does. h64 is round(round_dtype, fp32(x + residual)), the contract's h.
    """
    round_dtype = jnp.dtype(round_dtype or x.dtype)
    h = f64(x)
    if residual is not None:
        # the contract's h: the fp32 sum, rounded to h's dtype
        h = round_to(round_to(h + f64(residual), jnp.float32), round_dtype)
    rstd = 1.0 / np.sqrt(np.mean(h * h, axis=-1) + eps)
    y = h * rstd[..., None]
    if casting == "llama":
        y = round_to(y, round_dtype)
    if weight is not None:
        y = y * (f64(weight) + weight_offset)
    return y, h, rstd


def bwd64(dy, h64, weight=None, eps=1e-6, *, weight_offset=0.0, dh=None):
    """Float64 backward of y = h * rstd * w (straight through the llama rounding).

    Returns (dx (M..., N), dweight (N,) or None, dx_cond (M..., 1), dw_cond scalar): the
    conds are the sizes of the terms combined (see assert_grad_close).
    """
    dy = f64(dy)
    n = h64.shape[-1]
    rstd = 1.0 / np.sqrt(np.mean(h64 * h64, axis=-1, keepdims=True) + eps)
    xhat = h64 * rstd
    g = dy
    if weight is not None:
        g = dy * (f64(weight) + weight_offset)
    dx = rstd * (g - xhat * np.sum(g * xhat, axis=-1, keepdims=True) / n)
    dx_cond = rstd * np.max(np.abs(g), axis=-1, keepdims=True)
    if dh is not None:
        dx = dx + f64(dh)
        dx_cond = dx_cond + np.max(np.abs(f64(dh)), axis=-1, keepdims=True)
    dw, dw_cond = None, None
    if weight is not None:
        dw = np.sum((dy * xhat).reshape(-1, n), axis=0)
        dw_cond = np.max(np.sum(np.abs(dy * xhat).reshape(-1, n), axis=0))
    return dx, dw, dx_cond, dw_cond


def assert_llama_close(out, src, weight=None, eps=1e-6, *, weight_offset=0.0, what="y"):
    """Contract bound for casting="llama" (16-bit outputs): within one representable step of
    Hugging Face LlamaRMSNorm's steps, computed here in numpy float32 as HF does:
    variance = mean(src**2); t = src * rsqrt(variance + eps) rounded to src's dtype (src: x,
    or h when fused); y = round_out(t * (weight + offset)).

    One exception, inherent to the double rounding: where HF's fp32 t lies within 1e-6
    (relative) of a rounding tie of src's dtype, any other fp32 evaluation order (the
    kernel's sum, or HF's on another device) may round t the other way, one step of t, which
    after the weight can be two steps of y. There, two steps are allowed.
    """
    dtype = jnp.dtype(out.dtype)
    s32 = np.asarray(jnp.asarray(src).astype(jnp.float32))
    var = np.mean(s32 * s32, axis=-1, keepdims=True, dtype=np.float32)
    t = (s32 * (np.float32(1.0) / np.sqrt(var + np.float32(eps)))).astype(F64)
    tr = round_to(t, src.dtype)
    y = tr if weight is None else tr * (f64(weight) + weight_offset)
    expected = round_to(y, dtype)
    o = f64(out)
    assert np.array_equal(np.isnan(o), np.isnan(expected)), f"{what}: NaN positions differ"
    fin = ~np.isnan(o)
    dist = np.abs(_ordinal(o, dtype) - _ordinal(np.where(fin, expected, 0.0), dtype))
    dist = np.where(fin, dist, 0)
    to_tie = spacing(tr, src.dtype) / 2 - np.abs(t - tr)
    near_tie = np.abs(to_tie) <= 1e-6 * np.abs(t)
    far = int(np.max(np.where(near_tie, 0, dist), initial=0))
    assert far <= 1, f"{what} ({dtype}): {far} representable steps from LlamaRMSNorm's"
    near = int(np.max(dist, initial=0))
    assert near <= 2, f"{what} ({dtype}): {near} steps from LlamaRMSNorm's (near a tie)"


def _ordinal(a64: np.ndarray, dtype) -> np.ndarray:
    """Position of each value among the representable values of a 16-bit dtype."""
    bits = np.asarray(a64).astype(np.dtype(jnp.dtype(dtype))).view(np.int16).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFF), bits)


def run_python(script: str, **env) -> None:
    """Run a script in a fresh Python (for settings that must precede JAX's start) with this
    checkout importable; it must exit 0 and print OK last."""
    env = dict(os.environ, **env)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK"), out.stdout[-1000:]
