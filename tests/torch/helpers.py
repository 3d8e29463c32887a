"""Float64 references and ulp-based comparisons for the accel_torch tests."""

import torch

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's representable numbers at |ref| (float64), subnormals included."""
    fi = torch.finfo(dtype)
    mag = ref.abs().clamp_min(fi.tiny)
    exponent = torch.floor(torch.log2(mag))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


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
    err = (out64 - ref).abs() / ulp(ref, out.dtype)
    worst = err.argmax()
    assert err[worst] <= max_ulp, (
        f"{err[worst].item():.3f} ulp > {max_ulp} at out={out64[worst].item()}, "
        f"ref={ref[worst].item()}"
    )


def assert_grad_close(out: torch.Tensor, ref: torch.Tensor, rel: float, scale=None) -> None:
    """Gradient check: |out - ref| <= 1 ulp of out's dtype at ref + rel * scale.

    The ulp term is the final rounding to out's dtype; the rel term covers the fp32
    arithmetic (the row reduction mean(g * xhat), and dweight's sum over rows), which errs
    relative to the size of the terms combined, not to each element of the result.
    scale defaults to max|ref|; for dx pass the terms' size, max|rstd * g| (dx can cancel
    to far below it, e.g. at N = 1, where dx = rstd * g * eps / (x^2 + eps)).
    """
    out64 = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out64.shape == ref.shape
    if ref.numel() == 0:
        return
    scale = ref.abs().max() if scale is None else float(scale)
    bound = ulp(ref, out.dtype) + rel * scale
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


def reference(x, weight, eps=1e-6, weight_offset=0.0, casting="fp32"):
    """The forward reference of a casting: float64 for "fp32"; Hugging Face's for "llama"."""
    if casting == "llama" and weight is not None:
        return llama_rmsnorm_hf(x, weight.float() + weight_offset, eps).double()
    return rmsnorm64(x, weight, eps, weight_offset)


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf copy of t that requires grad."""
    return t.detach().double().requires_grad_(True)


def dx_scale(x: torch.Tensor, weight, dy: torch.Tensor, eps=1e-6, weight_offset=0.0) -> float:
    """max |rstd * dy * w|: the size of the terms dx is made of (float64)."""
    x64 = x.detach().double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    g = dy.double() if weight is None else dy.double() * (weight.double() + weight_offset)
    return (rstd * g).abs().max().item() if g.numel() else 0.0
