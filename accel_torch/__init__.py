"""accel_torch: RMSNorm and fused residual-add RMSNorm as Triton kernels for PyTorch.

    import accel_torch
    y = accel_torch.rmsnorm(x, weight)
    y, h = accel_torch.rmsnorm_residual_fused(x, residual, weight, return_residual=True)

See docs/design.md for the numerics. ``ACCEL_INTERPRET=1`` runs the kernels on CPU tensors in
Triton's interpreter (set it before importing).
"""

from . import _config  # noqa: F401, I001  (sets TRITON_INTERPRET before Triton loads)
from ._config import interpret_enabled, set_interpret
from .modules import TritonRMSNorm
from .ops import rmsnorm, rmsnorm_residual_fused
from .reference import rmsnorm_residual_torch, rmsnorm_torch
from .replace import RMSNormReplacement, replace_rmsnorm
from .sharding import register_on_dtensor_import

__version__ = "0.2.0"

register_on_dtensor_import()  # DTensor rules for the ops, once torch.distributed.tensor loads

__all__ = [
    "RMSNormReplacement",
    "TritonRMSNorm",
    "interpret_enabled",
    "replace_rmsnorm",
    "rmsnorm",
    "rmsnorm_residual_fused",
    "rmsnorm_residual_torch",
    "rmsnorm_torch",
    "set_interpret",
]
