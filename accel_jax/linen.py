"""``accel_jax.linen.RMSNorm``: a drop-in for ``flax.linen.RMSNorm`` on the Pallas kernels.

Same fields, same parameter (``scale``, shape (N,), ``param_dtype``), same params tree and the
same output dtype rule (``dtype`` if set, else the promotion of x and scale). Adds
``weight_offset``, ``casting`` and ``residual_dtype``, and an optional keyword-only
residual: ``__call__(x, *, residual=None, mask=None)`` returns y, or (y, h) with
``h = round(residual_dtype or x.dtype, x + residual)``. ``mask`` (flax's: elements left
out of the statistics) is refused with a ValueError.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax.linen import dtypes as linen_dtypes

from accel_jax import ops


def last_axis_only(name: str, axes, ndim: int) -> None:
    """Raise unless ``axes`` names only the last axis of an ndim-dimensional input."""
    seq = axes if isinstance(axes, (tuple, list)) else (axes,)
    try:
        canon = tuple(int(a) % ndim for a in seq)
    except (TypeError, ValueError):
        canon = None
    if canon != (ndim - 1,):
        raise ValueError(
            f"{name}={axes!r} is not supported: accel_jax RMSNorm normalizes over the last "
            f"axis only ({name}=-1)"
        )


def check_flax_options(module, x, mask) -> None:
    """Reject flax options whose math the kernels do not implement (nothing silently ignored)."""
    last_axis_only("reduction_axes", module.reduction_axes, x.ndim)
    last_axis_only("feature_axes", module.feature_axes, x.ndim)
    if module.axis_index_groups is not None:
        raise ValueError("axis_index_groups is not supported by accel_jax RMSNorm")
    if not getattr(module, "force_float32_reductions", True):
        raise ValueError(
            "force_float32_reductions=False is not supported: accel_jax RMSNorm always "
            "reduces in float32"
        )
    if mask is not None:
        raise ValueError(
            "mask is not supported by accel_jax RMSNorm (flax's mask leaves elements out of "
            "the statistics; here every element counts). A residual to add is passed by "
            "keyword: norm(x, residual=r)"
        )


def check_extra_options(module) -> None:
    if module.casting not in ("fp32", "llama"):
        raise ValueError(f"casting must be 'fp32' or 'llama', got {module.casting!r}")


class RMSNorm(nn.RMSNorm):
    """flax.linen.RMSNorm on the accel_jax kernels (fields: those of flax's RMSNorm, plus
    ``weight_offset`` (scale + offset is applied; 1.0 for Gemma) and ``casting``).

    x: (..., N) float16/bfloat16/float32 (float64 under jax_enable_x64). residual
    (keyword-only): None or x's shape.
    Returns y (..., N) in ``dtype`` or promote(x.dtype, param_dtype); with a residual, (y, h).
    """

    weight_offset: float = 0.0
    casting: str = "fp32"
    residual_dtype: Any = None  # dtype of h (the residual stream); default x's dtype

    @nn.compact
    def __call__(self, x, *, residual=None, mask=None):
        check_flax_options(self, x, mask)
        check_extra_options(self)
        scale = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
        args = (x,) if scale is None else (x, scale)
        out_dtype = linen_dtypes.canonicalize_dtype(*args, dtype=self.dtype)
        return ops.rmsnorm_general(
            x,
            residual,
            scale,
            self.epsilon,
            weight_offset=self.weight_offset,
            casting=self.casting,
            out_dtype=out_dtype,
            round_dtype=self.residual_dtype if residual is not None else None,
            return_residual=residual is not None,
            axis_name=self.axis_name,
        )


PallasRMSNorm = RMSNorm

__all__ = ["PallasRMSNorm", "RMSNorm"]
