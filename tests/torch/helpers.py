"""Float64 references and ulp-based comparisons for the accel_torch tests."""

import torch

from tests.numerics.ulp import spacing


def assert_within_ulp(out: torch.Tensor, ref: torch.Tensor, max_ulp: float = 1.0) -> None:
    """out (any float dtype) within max_ulp of the float64 ref, in out's dtype; NaN must match
    NaN. For float32 outputs the contract's bound is 1e-5 relative instead."""
    out64 = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    nan = ref.isnan()
    assert torch.equal(out64.isnan(), nan), "NaN pattern differs from the reference"
    out64, ref = out64[~nan], ref[~nan]
    if out64.numel() == 0:
        return
    if out.dtype == torch.float32:
        bound = 1e-5 * ref.abs()
        err = (out64 - ref).abs()
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (
            f"fp32 relative error {err[worst] / ref[worst].abs():.3g} > 1e-5 at "
            f"out={out64[worst].item()}, ref={ref[worst].item()}"
        )
        return
    err = (out64 - ref).abs() / spacing(ref, out.dtype)
    worst = err.argmax()
    assert err[worst] <= max_ulp, (
        f"{err[worst].item():.3f} ulp > {max_ulp} at out={out64[worst].item()}, "
        f"ref={ref[worst].item()}"
    )


def assert_grad_close(
    out: torch.Tensor, ref: torch.Tensor, rel: float, scale=None, slack=None
) -> None:
    """Gradient check: |out - ref| <= 1 ulp of out's dtype at ref + rel * scale (+ slack).

    The ulp term is the final rounding to out's dtype; the rel term covers the fp32
    arithmetic (the row reduction mean(g * xhat), and dweight's sum over rows), which errs
    relative to the size of the terms combined, not to each element of the result.
    scale defaults to max|ref|; for dx pass the terms' size, max|rstd * g| (dx can cancel
    to far below it, e.g. at N = 1, where dx = rstd * g * eps / (x^2 + eps)).
    slack: None or a per-element allowance shaped like ref, for a difference of the inputs
    the contract permits (the near-tie roundings of casting="llama"'s xhat).
    """
    out64 = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out64.shape == ref.shape
    if ref.numel() == 0:
        return
    scale = ref.abs().max() if scale is None else float(scale)
    bound = spacing(ref, out.dtype) + rel * scale
    if slack is not None:
        bound = bound + slack.detach().double().cpu()
    err = (out64 - ref).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"gradient error {err.flatten()[worst].item():.3g} > bound "
        f"{bound.flatten()[worst].item():.3g} (out={out64.flatten()[worst].item()}, "
        f"ref={ref.flatten()[worst].item()})"
    )


def rmsnorm64(x, weight=None, eps=1e-6, weight_offset=0.0):
    """Float64 RMSNorm of x (already rounded to its dtype), fp32 casting; differentiable."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x64 * rstd
    if weight is None:
        return xhat
    return xhat * (weight.double() + weight_offset)


def llama_rmsnorm_hf(x, weight, eps=1e-6):
    """Hugging Face LlamaRMSNorm's forward, statement for statement (the "llama" casting's
    reference): fp32 statistics, x*rstd rounded to x's dtype, then times weight."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a - b| in ulps of dtype at b (float64 result; NaN where either is NaN)."""
    a64, b64 = a.double(), b.double()
    return (a64 - b64).abs() / spacing(b64, dtype)


def assert_llama_matches_hf(y, x, weight, eps=1e-6, out_dtype=None, max_flip_share=1e-3):
    """y (casting="llama") against Hugging Face's LlamaRMSNorm formula on the same inputs.

    Every element must be within 1 ulp of HF's output, except where HF's fp32 x*rstd lies
    so near a rounding midpoint of x's dtype (within 2^-20 relative) that a last-bit
    difference in rstd (the row sum's order differs between any two implementations) rounds
    it the other way: there y must be within 1 ulp of weight times that other neighbour.
    Such near-ties must stay rare (at most max_flip_share of the elements). y is compared
    in out_dtype (default x's dtype; the fused op's y is in its x's dtype, not h's).
    """
    dtype = x.dtype
    out_dtype = out_dtype or dtype
    expected = llama_rmsnorm_hf(x, weight, eps).to(out_dtype)
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    rounded = xhat.to(dtype).double()
    step = spacing(rounded, dtype)
    other = torch.where(rounded > xhat.double(), rounded - step, rounded + step)
    near_tie = (xhat.double() - (rounded + other) / 2).abs() <= 2.0**-20 * xhat.double().abs()
    alternative = (other.float() * weight.float()).to(out_dtype)

    def within(a, b):  # the contract's bound: 1 ulp, or 1e-5 relative for fp32 outputs
        if out_dtype == torch.float32:
            return (a.double() - b.double()).abs() <= 1e-5 * b.double().abs()
        return ulp_distance(a, b, out_dtype) <= 1

    close = within(y, expected)
    flipped = ~close & near_tie & within(y, alternative)
    bad = ~(close | flipped) & ~(y.isnan() & expected.isnan())
    assert not bad.any(), (
        f"{int(bad.sum())} elements off HF's LlamaRMSNorm by more than 1 ulp, e.g. "
        f"y={y[bad][0].item()} vs {expected[bad][0].item()}"
    )
    assert flipped.sum() <= max_flip_share * y.numel() + 1, f"{int(flipped.sum())} near-tie flips"


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf copy of t that requires grad."""
    return t.detach().double().requires_grad_(True)


def dx_scale(x: torch.Tensor, weight, dy: torch.Tensor, eps=1e-6, weight_offset=0.0) -> float:
    """max |rstd * dy * w|: the size of the terms dx is made of (float64)."""
    x64 = x.detach().double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    g = dy.double() if weight is None else dy.double() * (weight.double() + weight_offset)
    return (rstd * g).abs().max().item() if g.numel() else 0.0
