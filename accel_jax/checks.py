"""Argument checks shared by the ops and the reference: clear errors naming the argument."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

F64 = jnp.dtype(jnp.float64)
# float64 is computed by the reference math (in float64); the kernels take the other three.
SUPPORTED_DTYPES = (
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.bfloat16),
    jnp.dtype(jnp.float32),
    F64,
)
CASTINGS = ("fp32", "llama")


def _names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def as_array(name: str, value):
    """value as a jax array, else TypeError.

    numpy arrays of any strides or byte order (views, broadcasts, big-endian data) are
    copied into a contiguous native array; lists, scalars and objects with ``__jax_array__``
    (Flax ``Param``) are converted the way jnp does.
    """
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        return jnp.asarray(value)
    if isinstance(value, (list, tuple, numbers.Number)) or hasattr(value, "__jax_array__"):
        return jnp.asarray(value)
    raise TypeError(f"{name} must be an array, got {type(value).__name__}")


def x64_enabled() -> bool:
    """Whether float64 arrays exist now (jax_enable_x64, globally or in a context)."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64)) == F64


def check_float_dtype(name: str, dtype) -> jnp.dtype:
    """dtype must be float16, bfloat16, float32 or (with jax_enable_x64) float64; returns it
    as a jnp.dtype."""
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype ({_names(SUPPORTED_DTYPES)}), got {dtype}"
        )
    if dtype == F64 and not x64_enabled():
        raise TypeError(
            f"{name}=float64 needs jax_enable_x64 (without it JAX has no float64 arrays): "
            "jax.config.update('jax_enable_x64', True), or use float32"
        )
    return dtype


def check_flag(name: str, value) -> bool:
    """A bool flag (Python or numpy bool); anything else is a TypeError, never truthiness."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _static_scalar(name: str, value, what: str):
    """A static real scalar (Python, numpy, or a concrete 0-d jax array) as a float."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static {what} (it fixes the compiled kernel), got a traced "
            "value: pass a Python float, not a jit argument"
        )
    ok = isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))
    if isinstance(value, (bool, np.bool_)) or not ok:
        raise TypeError(
            f"{name} must be a Python float (a static value), got {type(value).__name__}"
        )
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.shape != ():
            raise TypeError(f"{name} must be a scalar, got an array of shape {value.shape}")
        if not (
            jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        ):
            raise TypeError(f"{name} must be a real number, got dtype {value.dtype}")
    return float(value)


def check_eps(eps) -> float:
    """eps must be a static, finite, non-negative real number; returns it as a float."""
    value = _static_scalar("eps", eps, "float")
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
    value = _static_scalar("weight_offset", weight_offset, "float")
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
