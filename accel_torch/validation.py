"""Argument checks shared by the functional API and the module: clear errors, never wrong."""

import math
import numbers

import torch

CASTINGS = ("fp32", "llama")


def _real(name: str, value) -> float:
    """value as a float: Python and NumPy reals (not bools), as torch's own ops take them."""
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_eps(eps) -> float:
    eps = _real("eps", eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_casting(casting) -> str:
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    return casting


def check_flag(name: str, value) -> bool:
    """value must be a bool (a string such as "no" is truthy: never guess)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


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
    weight_offset = _real("weight_offset", weight_offset)
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
