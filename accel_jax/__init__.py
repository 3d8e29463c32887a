"""accel_jax: RMSNorm and fused residual-add RMSNorm as JAX Pallas (Triton) kernels.

Public API (the same as accel_torch's):
    rmsnorm(x, weight=None, eps=1e-6, *, weight_offset=0.0, casting="fp32")
    rmsnorm_residual_fused(x, residual, weight=None, eps=1e-6, *, weight_offset=0.0,
                           casting="fp32", return_residual=False, residual_dtype=None)
plus rmsnorm_reference / rmsnorm_residual_reference (plain jnp), the Flax modules
accel_jax.linen.RMSNorm (alias PallasRMSNorm) and accel_jax.nnx.RMSNorm, and
set_interpret(flag) and use_backend(choice), a context manager choosing the GPU kernels
("auto", "triton", "mosaic_gpu", "reference"; also ACCEL_JAX_BACKEND). ACCEL_INTERPRET=1
in the environment, read once at import, makes the kernels run in Pallas interpret mode (how
they are tested on a CPU). float64 inputs (under
jax_enable_x64) are computed in float64 by the reference math.
"""

import os

from accel_jax.backends import use_backend
from accel_jax.ops import (
    get_interpret,
    rmsnorm,
    rmsnorm_residual_fused,
    set_interpret,
)
from accel_jax.reference import rmsnorm_reference, rmsnorm_residual_reference

__version__ = "0.2.0"

set_interpret(
    os.environ.get("ACCEL_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")
)


def __getattr__(name):
    # The Flax modules import flax; load them only when asked for.
    if name in ("linen", "nnx"):
        import importlib

        return importlib.import_module(f"accel_jax.{name}")
    if name == "PallasRMSNorm":
        from accel_jax.linen import RMSNorm

        return RMSNorm
    raise AttributeError(f"module 'accel_jax' has no attribute {name!r}")


__all__ = [
    "__version__",
    "PallasRMSNorm",
    "get_interpret",
    "rmsnorm",
    "rmsnorm_reference",
    "rmsnorm_residual_fused",
    "rmsnorm_residual_reference",
    "set_interpret",
    "use_backend",
]
