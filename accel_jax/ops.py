"""RMSNorm ops: argument checks, dispatch, the custom_vjp gradient rule, public functions.

Dispatch, decided when a call is traced:
- ``interpret=True`` (or ``ACCEL_INTERPRET=1`` / ``set_interpret(True)``): the Pallas kernels
  run in Pallas interpret mode (any backend, CPU included): the Triton-lowered ones, or with
  ``ACCEL_JAX_BACKEND=mosaic_gpu`` the Mosaic GPU ones wherever they serve the shape (Mosaic
  GPU's interpret mode, its race detector on);
- x on a GPU (``jax.default_backend()`` under tracing): the compiled Pallas kernels, the
  Triton-lowered ones or Mosaic GPU's (``accel_jax.backends``:
  ``ACCEL_JAX_BACKEND`` picks or forces one, ``reference`` forces the reference math);
- otherwise: the plain-jnp reference math of ``accel_jax.reference`` (same numerics).
The reference math also serves float64 (computed in float64) and shapes with symbolic
dimensions (``jax.export``: the kernels need static shapes). On a JAX without the Pallas
Triton backend (one warning), the Mosaic GPU kernels run wherever they serve the shape on a
Hopper or newer GPU (or interpreted, with ``ACCEL_JAX_BACKEND=mosaic_gpu``), the reference
math everywhere else. Arrays of 2^32 bytes or more run the kernels in one
launch, as smaller ones do.

Every path goes through the same ``custom_vjp``: saved for backward are x (or h) and one fp32
rstd per row; the backward is the kernels' formula (or its jnp twin on CPU). The forward
and the backward inside it are ``custom_jvp`` functions whose derivatives are the reference
math's, so higher-order reverse mode (grad of grad, ``jax.hessian``, jvp of grad) is exact on
every path. Forward mode of the op itself (``jax.jvp``, ``jax.jacfwd``) is refused by JAX
("can't apply forward-mode autodiff (jvp) to a custom_vjp function"): use ``jax.jacrev``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from accel_jax import backends, checks, kernels, kernels_mgpu, sharding
from accel_jax.reference import compute_dtype, reference_bwd, reference_fwd

_STATE = {"interpret": False, "warned_no_kernels": set()}

# JAX >= 0.11 warns at every lowering of a Pallas Triton kernel. The warning is about JAX's
# roadmap, not about anything our users can change, so exactly that message is ignored.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


def set_interpret(flag: bool) -> None:
    """Run the Pallas kernels in interpret mode (True) or compiled / reference (False).

    Takes effect for calls traced afterwards (functions already jitted keep their choice).
    """
    _STATE["interpret"] = checks.check_flag("flag", flag)


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


def _kernels_available(mosaic_gpu: bool) -> bool:
    """Whether kernels can run: the Triton-lowered ones, or on a JAX without the Pallas
    Triton backend the Mosaic GPU ones where ``mosaic_gpu`` says they can (for the shapes
    they serve; backends sends the rest to the reference math). Warns once per outcome."""
    if kernels.UNAVAILABLE is None:
        return True
    if mosaic_gpu:
        instead = (
            "RMSNorm runs the Mosaic GPU kernels where they serve the shape and the plain-jnp "
            "reference math elsewhere (same numerics)"
        )
    else:
        instead = (
            "RMSNorm runs on the plain-jnp reference math instead (same numerics, without "
            "the kernels' speed)"
        )
    if instead not in _STATE["warned_no_kernels"]:
        _STATE["warned_no_kernels"].add(instead)
        warnings.warn(
            f"accel_jax: this JAX ({jax.__version__}) has no Pallas Triton backend "
            f"({kernels.UNAVAILABLE}); {instead}",
            RuntimeWarning,
            stacklevel=4,
        )
    return mosaic_gpu


def _mode(x, interpret, wide: bool) -> str:
    """The path (module docstring); wide: some dtype is float64."""
    interpret = (
        _STATE["interpret"] if interpret is None else checks.check_flag("interpret", interpret)
    )
    static = all(isinstance(d, int) for d in x.shape)
    if wide or not static or not (interpret or _on_gpu(x)):
        return "reference"
    choice = backends.backend()
    if interpret:
        mosaic = choice == "mosaic_gpu"
        if not _kernels_available(mosaic and kernels_mgpu.INTERPRET_UNAVAILABLE is None):
            return "reference"
        return "interpret-mosaic_gpu" if mosaic else "interpret"
    if choice == "reference":
        return "reference"
    backends.check_forced(choice)
    if not _kernels_available(backends.mosaic_gpu_usable()):
        return "reference"
    quiet_triton_deprecation()
    return "pallas" if choice == "auto" else f"pallas-{choice}"


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
    mode: str  # "pallas" (or "pallas-triton" / "pallas-mosaic_gpu") | "interpret" (or
    # "interpret-mosaic_gpu") | "reference"
    axis_name: Any = None  # named axes splitting the hidden axis (Flax's axis_name)


def _stat_dtype(spec: _Spec, *arrays):
    """rstd's dtype: float32, or float64 when the reference computes in float64."""
    dtypes = [a.dtype for a in arrays if a is not None]
    return compute_dtype(spec.out_dtype, spec.round_dtype, *dtypes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4))
def _forward(spec: _Spec, x, residual, weight, save: bool):
    """(..., N) forward; returns (y, h or None, rstd (...,) or None)."""
    fused = residual is not None
    need_h = fused and (save or spec.return_residual)
    if math.prod(x.shape[:-1]) == 0:
        h = jnp.zeros(x.shape, spec.round_dtype) if need_h else None
        rstd = jnp.zeros(x.shape[:-1], _stat_dtype(spec, x, residual, weight)) if save else None
        return jnp.zeros(x.shape, spec.out_dtype), h, rstd
    args = sharding.fwd_args(spec)
    return sharding.rmsnorm_fwd(
        x,
        residual,
        weight,
        need_h=need_h,
        save=save,
        mode=spec.mode,
        axis_name=spec.axis_name,
        **args,
    )


@_forward.defjvp
def _forward_jvp(spec: _Spec, save: bool, primals, tangents):
    # Reached only by higher-order autodiff (the custom_vjp below serves first order): the
    # value from the chosen path, the tangent from the reference math (jnp, any order).
    def reference(x, residual, weight):
        need_h = residual is not None and (save or spec.return_residual)
        y, h, rstd = reference_fwd(
            x, residual, weight, need_h=need_h, axis_name=spec.axis_name, **sharding.fwd_args(spec)
        )
        return y, h, (rstd if save else None)

    return _forward(spec, *primals, save), jax.jvp(reference, primals, tangents)[1]


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


def _bwd_parts(spec: _Spec, cts):
    """(dy, dh or None, fused, dres_dtype): dres_dtype is the residual's dtype where it
    differs from x's (d residual then is written a second time, in that dtype)."""
    fused = spec.res_dtype is not None
    dy, dh = cts if spec.return_residual else (cts, None)
    dres_dtype = spec.res_dtype if fused and spec.res_dtype != spec.x_dtype else None
    return dy, dh, fused, dres_dtype


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _rmsnorm_2d_bwd(spec: _Spec, res, cts):
    saved, rstd, weight = res
    dy, dh, fused, dres_dtype = _bwd_parts(spec, cts)
    if math.prod(saved.shape[:-1]) == 0:
        dx = jnp.zeros(saved.shape, spec.x_dtype)
        dres = jnp.zeros(saved.shape, dres_dtype) if dres_dtype is not None else None
        dweight = jnp.zeros_like(weight) if weight is not None else None
    else:
        args = dict(weight_offset=spec.weight_offset, dx_dtype=spec.x_dtype, dres_dtype=dres_dtype)
        dx, dres, dweight = sharding.rmsnorm_bwd(
            dy, saved, rstd, weight, dh, mode=spec.mode, axis_name=spec.axis_name, **args
        )
    dresidual = (dres if dres is not None else dx) if fused else None
    return dx, dresidual, dweight


@_rmsnorm_2d_bwd.defjvp
def _rmsnorm_2d_bwd_jvp(spec: _Spec, primals, tangents):
    # Differentiating the backward (grad of grad): the tangent from the reference formula,
    # in every input (rstd included, whose own tangent comes from the forward's jvp).
    def reference(res, cts):
        saved, rstd, weight = res
        dy, dh, fused, dres_dtype = _bwd_parts(spec, cts)
        dx, dres, dweight = reference_bwd(
            dy,
            saved,
            rstd,
            weight,
            dh,
            weight_offset=spec.weight_offset,
            dx_dtype=spec.x_dtype,
            dres_dtype=dres_dtype,
            axis_name=spec.axis_name,
        )
        return dx, ((dres if dres is not None else dx) if fused else None), dweight

    return _rmsnorm_2d_bwd(spec, *primals), jax.jvp(reference, primals, tangents)[1]


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
    axis_name=None,
):
    """The one entry point behind the public functions and the Flax modules.

    x: (..., N) fp16/bf16/fp32. residual: None or x's shape (fused add). weight: None or (N,).
    out_dtype: y's dtype (default x's). round_dtype: h's dtype and the llama rounding dtype
    (default x's). axis_name: None, or the named axes (shard_map / vmap) the hidden axis is
    split over, for statistics over whole rows (Flax's axis_name). Returns y, or (y, h) with
    return_residual (fused only).
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
    return_residual = checks.check_flag("return_residual", return_residual)
    if return_residual and residual is None:
        raise ValueError("return_residual=True needs a residual")

    dtypes = [x.dtype, out_dtype, round_dtype] + [
        a.dtype for a in (residual, weight) if a is not None
    ]
    wide = checks.F64 in dtypes
    spec = _Spec(
        eps=eps,
        weight_offset=weight_offset,
        llama=llama,
        out_dtype=out_dtype,
        round_dtype=round_dtype,
        x_dtype=x.dtype,
        res_dtype=residual.dtype if residual is not None else None,
        return_residual=return_residual,
        mode=_mode(x, interpret, wide),
        axis_name=tuple(axis_name) if isinstance(axis_name, list) else axis_name,
    )
    # N-D arrays go through: the sharding layer partitions them and flattens each block.
    x, residual, weight = sharding.prepare(x, residual, weight, axis_name=spec.axis_name)
    return _rmsnorm_2d_jit(spec, x, residual, weight)


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
