"""Error measures in units of the last place (ulp) of a floating dtype.

All functions take torch tensors and return float64 tensors or Python floats; NaN is handled
explicitly (NaN against NaN is no error, NaN against a number is an infinite error) so a NaN
can neither hide an error nor be hidden by one.
"""

from __future__ import annotations

import math

import torch

# (significand bits including the implicit one, smallest normal exponent)
_FORMATS = {
    torch.float32: (24, -126),
    torch.float16: (11, -14),
    torch.bfloat16: (8, -126),
}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def is_low_precision(dtype: torch.dtype) -> bool:
    """True for the 16-bit formats, whose bounds are stated in ulps (fp32 uses relative)."""
    return dtype in (torch.float16, torch.bfloat16)


def spacing(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ulp of ``dtype`` at each value of ``ref`` (any shape, float64 result).

    The spacing of the binade that holds |ref|; in the subnormal range (and at 0) it is the
    smallest subnormal. Values beyond the dtype's range get the spacing of its top binade.
    """
    p, emin = _FORMATS[dtype]
    a = ref.double().abs()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, torch.zeros_like(a))
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    emax = int(torch.finfo(dtype).max).bit_length() - 1
    exp = torch.clamp(e.to(torch.int64) - 1, min=emin, max=emax)
    exp = torch.where(a == 0, torch.full_like(exp, emin), exp)
    return torch.ldexp(torch.ones_like(a), exp - (p - 1))


def _nan_aware(err: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_nan, b_nan = torch.isnan(a), torch.isnan(b)
    err = torch.where(a_nan & b_nan, torch.zeros_like(err), err)
    err = torch.where(a_nan ^ b_nan, torch.full_like(err, float("inf")), err)
    # Equal values (same-signed infinities included) are no error.
    return torch.where(a == b, torch.zeros_like(err), err)


def saturate(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ref`` (float64) with values that round to +-inf in ``dtype`` replaced by +-inf.

    A result beyond the format's range is correctly rounded to infinity, so that is what
    a kernel's output is held to there.
    """
    r = ref.double()
    big = torch.finfo(dtype).max
    limit = big + 0.5 * float(spacing(torch.tensor(big, dtype=torch.float64), dtype))
    return torch.where(r.abs() >= limit, torch.sign(r) * torch.inf, r)


def ulp_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|out - ref| in ulps of ``dtype`` at ``ref``, elementwise (float64).

    ``out``: values of ``dtype`` (any float tensor); ``ref``: the exact (float64) result.
    """
    o, r = out.double(), saturate(ref, dtype)
    err = (o - r).abs() / spacing(r, dtype)
    err = torch.where(torch.isfinite(o) & torch.isfinite(r), err, torch.full_like(err, torch.inf))
    return _nan_aware(err, o, r)


def rel_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|out - ref| / |ref| elementwise (float64), 0 where ``out`` is within 1 ulp of ``ref``.

    The 1-ulp escape keeps a relative bound meaningful at 0 and in the subnormal range,
    where the format itself has fewer significant bits than the bound asks for.
    """
    o, r = out.double(), saturate(ref, dtype)
    err = (o - r).abs() / r.abs()
    err = torch.where(ulp_error(o, r, dtype) <= 1, torch.zeros_like(err), err)
    return _nan_aware(err, o, r)


def ordinal_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable steps between ``a`` and ``b`` (same dtype), elementwise.

    Exact integer distance between the two bit patterns on the ordered number line (+0 and
    -0 are the same point); NaN against NaN is 0, NaN against a number is inf.
    """
    if a.dtype != b.dtype:
        raise TypeError(f"ordinal_distance needs one dtype, got {a.dtype} and {b.dtype}")
    magnitude = (1 << (torch.finfo(a.dtype).bits - 1)) - 1

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)

    d = (ordered(a) - ordered(b)).abs().double()
    return _nan_aware(d, a, b)


def row_error(
    out: torch.Tensor, other: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """Per-row max |out - other|, in units of the row's largest |scale|.

    For gradients, where cancellation makes per-element bounds meaningless, the natural
    scale of a row is its largest value. With ``dtype`` the unit is the ulp of ``dtype`` at
    that largest value; without it, the largest value itself (a relative error).
    ``out``, ``other``, ``scale``: (..., N), a 1-D tensor being one row -> (rows,) float64.
    NaN against NaN is no error, NaN against a number an infinite one.
    """
    n = out.shape[-1] if out.dim() else 1
    o = out.double().reshape(-1, n)
    b = other.double().reshape(o.shape)
    if dtype is not None and other.dtype == torch.float64:
        b = saturate(b, dtype)
    s = scale.double().reshape(o.shape)
    if o.numel() == 0:
        return o.new_zeros(o.shape[0])
    diff = _nan_aware((o - b).abs(), o, b).amax(dim=-1)
    top = torch.nan_to_num(s.abs(), nan=0.0, posinf=0.0).amax(dim=-1)
    if dtype is not None:
        return diff / spacing(top, dtype)
    err = diff / top.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(diff == 0, torch.zeros_like(err), err)


def interval_distance(out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Steps of ``out``'s dtype from ``out`` to the interval [lo, hi] (0 inside), elementwise.

    All three in one dtype; NaN bounds admit only NaN.
    """
    inside = (out >= lo) & (out <= hi)
    d = torch.minimum(ordinal_distance(out, lo), ordinal_distance(out, hi))
    d = torch.where(inside, torch.zeros_like(d), d)
    nan_ref = torch.isnan(lo) | torch.isnan(hi)
    d = torch.where(nan_ref & torch.isnan(out), torch.zeros_like(d), d)
    return torch.where(nan_ref ^ torch.isnan(out), torch.full_like(d, torch.inf), d)


def max_or_zero(t: torch.Tensor) -> float:
    """Largest value of ``t`` as a Python float (0 for an empty tensor, NaN counts as inf)."""
    if t.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(t.double(), nan=math.inf, posinf=math.inf).max())
