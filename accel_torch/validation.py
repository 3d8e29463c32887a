"""Argument checks shared by the functional API and the module: clear errors, never wrong."""

import math

import torch

CASTINGS = ("fp32", "llama")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_casting(casting) -> str:
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    return casting


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


def check_rmsnorm_args(x, weight, eps, weight_offset, casting):
    """Validate the common arguments; returns (eps, weight_offset) as floats."""
    check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized last axis)")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"x's last dimension (N) must be >= 1, got x.shape={tuple(x.shape)}")
    if weight is not None:
        check_float_tensor("weight", weight)
        if tuple(weight.shape) != (n,):
            raise ValueError(
                f"weight must have shape ({n},) to match x's last dimension, "
                f"got weight.shape={tuple(weight.shape)}, x.shape={tuple(x.shape)}"
            )
        if weight.device != x.device:
            raise ValueError(
                f"weight must be on x's device: weight on {weight.device}, x on {x.device}"
            )
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(f"weight_offset must be a float, got {type(weight_offset).__name__}")
    weight_offset = float(weight_offset)
    if not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be finite, got {weight_offset}")
    if weight is None and weight_offset != 0.0:
        raise ValueError(f"weight_offset={weight_offset} needs a weight; weight is None")
    check_casting(casting)
    return check_eps(eps), weight_offset


def check_residual_args(x, residual, residual_dtype):
    """Validate the fused op's extra arguments; returns the dtype h is rounded to."""
    check_float_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape: residual.shape={tuple(residual.shape)}, "
            f"x.shape={tuple(x.shape)}"
        )
    if residual.device != x.device:
        raise ValueError(
            f"residual must be on x's device: residual on {residual.device}, x on {x.device}"
        )
    if residual_dtype is None:
        return x.dtype
    if not isinstance(residual_dtype, torch.dtype) or not residual_dtype.is_floating_point:
        raise TypeError(f"residual_dtype must be a floating torch.dtype, got {residual_dtype!r}")
    return residual_dtype
