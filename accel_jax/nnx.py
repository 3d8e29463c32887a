"""``accel_jax.nnx.RMSNorm``: a drop-in for ``flax.nnx.RMSNorm`` on the Pallas kernels.

Same constructor and state (``scale`` Param of shape (num_features,)), the same dtype
promotion (``promote_dtype((x, scale), dtype=dtype)`` first), plus ``weight_offset``,
``casting`` and ``residual_dtype``; ``__call__(x, mask=None, *, residual=None)`` returns y or
(y, h) (the residual is keyword-only: flax's second argument is ``mask``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from flax import nnx

from accel_jax import ops
from accel_jax.linen import check_flax_options

# flax's own defaults, so that this signature shows (and keeps) exactly flax's.
_FLAX_DEFAULTS = {
    name: p.default for name, p in inspect.signature(nnx.RMSNorm.__init__).parameters.items()
}


class RMSNorm(nnx.RMSNorm):
    """flax.nnx.RMSNorm on the accel_jax kernels.

    Takes flax's arguments (same names, defaults and meaning) plus ``weight_offset=0.0``,
    ``casting="fp32"`` and ``residual_dtype=None`` (h's dtype; default x's).
    ``__call__(x, mask=None, *, residual=None)``: x (..., num_features); mask must be None
    (flax's mask is refused with a ValueError); residual (keyword-only) None or x's shape.
    Returns y, or (y, h) with a residual.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = _FLAX_DEFAULTS["epsilon"],
        dtype: Any = _FLAX_DEFAULTS["dtype"],
        param_dtype: Any = _FLAX_DEFAULTS["param_dtype"],
        use_scale: bool = _FLAX_DEFAULTS["use_scale"],
        scale_init: Any = _FLAX_DEFAULTS["scale_init"],
        reduction_axes: Any = _FLAX_DEFAULTS["reduction_axes"],
        feature_axes: Any = _FLAX_DEFAULTS["feature_axes"],
        axis_name: str | None = _FLAX_DEFAULTS["axis_name"],
        axis_index_groups: Any = _FLAX_DEFAULTS["axis_index_groups"],
        use_fast_variance: bool = _FLAX_DEFAULTS["use_fast_variance"],
        promote_dtype: Any = _FLAX_DEFAULTS["promote_dtype"],
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _FLAX_DEFAULTS["scale_metadata"],
        weight_offset: float = 0.0,
        casting: str = "fp32",
        residual_dtype: Any = None,
        **kwargs,
    ):
        if casting not in ("fp32", "llama"):
            raise ValueError(f"casting must be 'fp32' or 'llama', got {casting!r}")
        super().__init__(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_scale=use_scale,
            scale_init=scale_init,
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            **kwargs,  # options of a newer flax, passed on as they are
        )
        self.weight_offset = weight_offset
        self.casting = casting
        self.residual_dtype = residual_dtype

    def __call__(self, x, mask=None, *, residual=None):
        check_flax_options(self, x, mask)
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"x must have num_features={self.num_features} on its last axis, "
                f"got x.shape={x.shape}"
            )
        scale = self.scale[...] if self.scale is not None else None
        x, scale = self.promote_dtype((x, scale), dtype=self.dtype)
        return ops.rmsnorm_general(
            x,
            residual,
            scale,
            self.epsilon,
            weight_offset=self.weight_offset,
            casting=self.casting,
            round_dtype=self.residual_dtype if residual is not None else None,
            return_residual=residual is not None,
            axis_name=self.axis_name,
        )


__all__ = ["RMSNorm"]
