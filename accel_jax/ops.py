"""RMSNorm ops: argument checks, dispatch, the custom_vjp gradient rule, public functions.

Dispatch, decided when a call is traced:
- ``interpret=True`` (or ``ACCEL_INTERPRET=1`` / ``set_interpret(True)``): the Pallas kernels
  run in Pallas interpret mode (any backend, CPU included);
- x on a GPU (``jax.default_backend()`` under tracing): the compiled Pallas Triton kernels;
- otherwise: the plain-jnp reference math of ``accel_jax.reference`` (same numerics).

Every path goes through the same ``custom_vjp``: saved for backward are x (or h) and one fp32
rstd per row; the backward is the kernels' formula (or its jnp twin on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from accel_jax import checks, kernels
from accel_jax.reference import reference_bwd, reference_fwd

_STATE = {"interpret": False}

# JAX >= 0.11 warns at every lowering of a Pallas Triton kernel. The warning is about JAX's
# roadmap, not about anything our users can change, so exactly that message is ignored.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


def set_interpret(flag: bool) -> None:
    """Run the Pallas kernels in interpret mode (True) or compiled / reference (False).

    Takes effect for calls traced afterwards (functions already jitted keep their choice).
    """
    _STATE["interpret"] = bool(flag)


def get_interpret() -> bool:
    """Whether kernels currently run in interpret mode by default."""
    return _STATE["interpret"]


def quiet_triton_deprecation() -> None:
    """Ignore the Pallas Triton deprecation warning (that message and category only).

    Re-inserted at the front of the filter list whenever a kernel is traced, since the
    warning is raised later, when the enclosing jit lowers, and test runners or users may
    have pushed other filters in front in the meantime.
    """
    top = warnings.filters[0] if warnings.filters else None
    if (
        top is not None
        and top[0] == "ignore"
        and isinstance(top[1], re.Pattern)
        and top[1].pattern == TRITON_DEPRECATION
        and top[2] is DeprecationWarning
    ):
        return
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _on_gpu(x) -> bool:
    gpu = ("gpu", "cuda", "rocm")
    if isinstance(x, jax.core.Tracer):
        return jax.default_backend() in gpu
    try:
        return any(d.platform in gpu for d in x.devices())
    except (AttributeError, RuntimeError):
        return jax.default_backend() in gpu


def _mode(x, interpret) -> str:
    if interpret is None:
        interpret = _STATE["interpret"]
    if interpret:
        return "interpret"
    if _on_gpu(x):
        quiet_triton_deprecation()
        return "pallas"
    return "reference"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static configuration of one op call (hashable: it keys jit's cache)."""

    eps: float
    weight_offset: float
    llama: bool
    out_dtype: Any  # y's dtype
    round_dtype: Any  # h's dtype (fused) and the llama intermediate rounding
    x_dtype: Any
    res_dtype: Any  # residual input dtype, None when not fused
    return_residual: bool
    mode: str  # "pallas" | "interpret" | "reference"


def _forward(spec: _Spec, x, residual, weight, save: bool):
    """(M, N) forward; returns (y, h or None, rstd or None)."""
    fused = residual is not None
    need_h = fused and (save or spec.return_residual)
    m, n = x.shape
    if m == 0:
        h = jnp.zeros((0, n), spec.round_dtype) if need_h else None
        rstd = jnp.zeros((0,), jnp.float32) if save else None
        return jnp.zeros((0, n), spec.out_dtype), h, rstd
    args = dict(
        eps=spec.eps,
        weight_offset=spec.weight_offset,
        llama=spec.llama,
        out_dtype=spec.out_dtype,
        round_dtype=spec.round_dtype,
    )
    if spec.mode == "reference":
        y, h, rstd = reference_fwd(x, residual, weight, need_h=need_h, **args)
        return y, h, (rstd if save else None)
    return kernels.rmsnorm_fwd(
        x,
        residual,
        weight,
        store_h=need_h,
        store_rstd=save,
        interpret=spec.mode == "interpret",
        **args,
    )


def _outputs(spec: _Spec, y, h):
    return (y, h) if spec.return_residual else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rmsnorm_2d(spec: _Spec, x, residual, weight):
    y, h, _ = _forward(spec, x, residual, weight, save=False)
    return _outputs(spec, y, h)


def _rmsnorm_2d_fwd(spec: _Spec, x, residual, weight):
    y, h, rstd = _forward(spec, x, residual, weight, save=True)
    saved = h if residual is not None else x
    return _outputs(spec, y, h), (saved, rstd, weight)


def _rmsnorm_2d_bwd(spec: _Spec, res, cts):
    saved, rstd, weight = res
    fused = spec.res_dtype is not None
    dy, dh = cts if spec.return_residual else (cts, None)
    dres_dtype = spec.res_dtype if fused and spec.res_dtype != spec.x_dtype else None
    m, n = saved.shape
    if m == 0:
        dx = jnp.zeros((0, n), spec.x_dtype)
        dres = jnp.zeros((0, n), dres_dtype) if dres_dtype is not None else None
        dweight = jnp.zeros_like(weight) if weight is not None else None
    else:
        args = dict(weight_offset=spec.weight_offset, dx_dtype=spec.x_dtype, dres_dtype=dres_dtype)
        if spec.mode == "reference":
            dx, dres, dweight = reference_bwd(dy, saved, rstd, weight, dh, **args)
        else:
            dx, dres, dweight = kernels.rmsnorm_bwd(
                dy, saved, rstd, weight, dh, interpret=spec.mode == "interpret", **args
            )
    dresidual = (dres if dres is not None else dx) if fused else None
    return dx, dresidual, dweight


_rmsnorm_2d.defvjp(_rmsnorm_2d_fwd, _rmsnorm_2d_bwd)
_rmsnorm_2d_jit = jax.jit(_rmsnorm_2d, static_argnums=(0,))


def rmsnorm_general(
    x,
    residual=None,
    weight=None,
    eps=1e-6,
    *,
    weight_offset=0.0,
    casting="fp32",
    out_dtype=None,
    round_dtype=None,
    return_residual=False,
    interpret=None,
):
    """The one entry point behind the public functions and the Flax modules.

    x: (..., N) fp16/bf16/fp32. residual: None or x's shape (fused add). weight: None or (N,).
    out_dtype: y's dtype (default x's). round_dtype: h's dtype and the llama rounding dtype
    (default x's). Returns y, or (y, h) with return_residual (fused only).
    """
    x = checks.check_x(x)
    weight = checks.check_weight(weight, x)
    if residual is not None:
        residual = checks.check_residual(residual, x)
    eps = checks.check_eps(eps)
    llama = checks.check_casting(casting)
    weight_offset = checks.check_weight_offset(weight_offset, weight)
    out_dtype = checks.check_float_dtype("out_dtype", out_dtype or x.dtype)
    round_dtype = checks.check_float_dtype("round_dtype", round_dtype or x.dtype)
    if not isinstance(return_residual, bool):
        raise TypeError(f"return_residual must be a bool, got {type(return_residual).__name__}")
    if return_residual and residual is None:
        raise ValueError("return_residual=True needs a residual")

    spec = _Spec(
        eps=eps,
        weight_offset=weight_offset,
        llama=llama,
        out_dtype=out_dtype,
        round_dtype=round_dtype,
        x_dtype=x.dtype,
        res_dtype=residual.dtype if residual is not None else None,
        return_residual=return_residual,
        mode=_mode(x, interpret),
    )
    shape, n = x.shape, x.shape[-1]
    r2 = residual.reshape(-1, n) if residual is not None else None
    out = _rmsnorm_2d_jit(spec, x.reshape(-1, n), r2, weight)
    if return_residual:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)


def rmsnorm(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32", interpret=None):
    """RMSNorm over the last axis.

    x: (..., N) float16/bfloat16/float32, any leading shape (0 rows included), N >= 1.
    weight: None (no scaling) or (N,) of any of those dtypes; scaled by weight + weight_offset.
    casting: "fp32" (one rounding of x*rstd*w) or "llama" (round x*rstd to x's dtype first).
    interpret: None follows ACCEL_INTERPRET / set_interpret; True forces Pallas interpret mode.
    Returns y with x's shape and dtype. Differentiable (custom_vjp) in x and weight.
    """
    return rmsnorm_general(
        x, None, weight, eps, weight_offset=weight_offset, casting=casting, interpret=interpret
    )


def rmsnorm_residual_fused(
    x,
    residual,
    weight=None,
    eps=1e-6,
    *,
    weight_offset=0.0,
    casting="fp32",
    return_residual=False,
    residual_dtype=None,
    interpret=None,
):
    """Fused residual add + RMSNorm: h = round(residual_dtype or x.dtype, x + residual),
    y = rmsnorm(h) in x's dtype.

    x, residual: (..., N) float arrays of the same shape (dtypes may differ).
    Returns y, or (y, h) with return_residual=True. Gradients: d residual = d x =
    dx_norm + dh, each in its input's dtype; dweight in weight's dtype.
    """
    if residual is None:
        raise TypeError("residual must be an array of x's shape, got None (use rmsnorm)")
    round_dtype = checks.check_residual_dtype(residual_dtype)
    return rmsnorm_general(
        x,
        residual,
        weight,
        eps,
        weight_offset=weight_offset,
        casting=casting,
        round_dtype=round_dtype,
        return_residual=return_residual,
        interpret=interpret,
    )
