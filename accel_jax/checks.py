"""Argument checks shared by the ops and the reference: clear errors naming the argument."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
CASTINGS = ("fp32", "llama")


def _names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def as_array(name: str, value):
    """value as a jax array (numpy arrays and lists are converted), else TypeError."""
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, (np.ndarray, np.generic, list, tuple, numbers.Number)):
        return jnp.asarray(value)
    raise TypeError(f"{name} must be an array, got {type(value).__name__}")


def check_float_dtype(name: str, dtype) -> jnp.dtype:
    """dtype must be float16, bfloat16 or float32; returns it as a jnp.dtype."""
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype ({_names(SUPPORTED_DTYPES)}), got {dtype}"
        )
    return dtype


def check_eps(eps) -> float:
    """eps must be a static, finite, non-negative real number; returns it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, np.ndarray, np.generic)):
        raise TypeError(f"eps must be a Python float (a static value), got {type(eps).__name__}")
    if isinstance(eps, np.ndarray) and eps.shape != ():
        raise TypeError(f"eps must be a scalar, got an array of shape {eps.shape}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0, got {value}")
    return value


def check_casting(casting) -> bool:
    """casting must be "fp32" or "llama"; returns True for llama."""
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    return casting == "llama"


def check_weight_offset(weight_offset, weight) -> float:
    """weight_offset must be finite, and 0 when there is no weight."""
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (numbers.Real, np.generic)):
        raise TypeError(f"weight_offset must be a Python float, got {type(weight_offset).__name__}")
    value = float(weight_offset)
    if not math.isfinite(value):
        raise ValueError(f"weight_offset must be finite, got {value}")
    if weight is None and value != 0.0:
        raise ValueError(
            f"weight_offset={value} needs a weight: with weight=None nothing is scaled "
            "(pass weight, or weight_offset=0.0)"
        )
    return value


def check_x(x):
    """x: (..., N) float array with N >= 1; returns x as an array."""
    x = as_array("x", x)
    check_float_dtype("x", x.dtype)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (..., N), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a hidden size N >= 1, got x.shape={x.shape}")
    return x


def check_weight(weight, x):
    """weight: None or an (N,) float array matching x's last axis."""
    if weight is None:
        return None
    weight = as_array("weight", weight)
    check_float_dtype("weight", weight.dtype)
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(
            f"weight must have shape (N,) = ({n},) for x.shape={x.shape}, "
            f"got weight.shape={weight.shape}"
        )
    check_same_devices("weight", weight, x)
    return weight


def check_residual(residual, x):
    """residual: a float array of x's shape (its dtype may differ)."""
    residual = as_array("residual", residual)
    check_float_dtype("residual", residual.dtype)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape: x.shape={x.shape}, residual.shape={residual.shape}"
        )
    check_same_devices("residual", residual, x)
    return residual


def _devices(a):
    if isinstance(a, jax.core.Tracer):
        return None
    try:
        if not a.committed:
            return None
        return a.sharding.device_set
    except AttributeError:
        return None


def check_same_devices(name: str, a, x):
    """Concrete, committed arrays must live on x's devices (tracers are checked by jit)."""
    da, dx = _devices(a), _devices(x)
    if da is not None and dx is not None and da != dx:
        raise ValueError(
            f"{name} must be on the same devices as x: x on {sorted(map(str, dx))}, "
            f"{name} on {sorted(map(str, da))}"
        )


def check_residual_dtype(residual_dtype):
    """residual_dtype: None or a supported float dtype."""
    if residual_dtype is None:
        return None
    try:
        dtype = jnp.dtype(residual_dtype)
    except TypeError as e:
        raise TypeError(f"residual_dtype must be a float dtype, got {residual_dtype!r}") from e
    return check_float_dtype("residual_dtype", dtype)
