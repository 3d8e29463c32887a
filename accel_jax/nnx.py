"""``accel_jax.nnx.RMSNorm``: a drop-in for ``flax.nnx.RMSNorm`` on the Pallas kernels.

Same constructor and state (``scale`` Param of shape (num_features,)), the same dtype
promotion (``promote_dtype((x, scale), dtype=dtype)`` first), plus ``weight_offset`` and
``casting``; ``__call__(x, residual=None)`` returns y or (y, h).
"""

from __future__ import annotations

from flax import nnx

from accel_jax import ops
from accel_jax.linen import check_flax_options


class RMSNorm(nnx.RMSNorm):
    """flax.nnx.RMSNorm on the accel_jax kernels.

    Takes flax's arguments plus ``weight_offset=0.0``, ``casting="fp32"`` and
    ``residual_dtype=None`` (h's dtype; default x's).
    x: (..., num_features). residual: None or x's shape. Returns y, or (y, h) with a residual.
    """

    def __init__(
        self,
        num_features: int,
        *,
        weight_offset: float = 0.0,
        casting: str = "fp32",
        residual_dtype=None,
        **kwargs,
    ):
        if casting not in ("fp32", "llama"):
            raise ValueError(f"casting must be 'fp32' or 'llama', got {casting!r}")
        super().__init__(num_features, **kwargs)
        self.weight_offset = weight_offset
        self.casting = casting
        self.residual_dtype = residual_dtype

    def __call__(self, x, residual=None, *, mask=None):
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
        )


__all__ = ["RMSNorm"]
