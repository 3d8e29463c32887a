"""Which kernels run a compiled GPU forward: the Triton-lowered ones or Mosaic GPU's.

``ACCEL_JAX_BACKEND`` (read when a call is traced):
- ``auto`` (default): Mosaic GPU for the fused residual forward on compute capability 9.0+
  from ``MGPU_FUSED_MIN_ROWS`` rows, where it measured faster on the H200 (bench/NOTES.md);
  the Triton-lowered kernels for everything else;
- ``triton``: the Triton-lowered kernels only;
- ``mosaic_gpu``: Mosaic GPU for every forward it serves (``kernels_mgpu.supported``), the
  Triton-lowered kernels for the rest;
- ``reference``: the plain-jnp reference math everywhere (no kernels).
The setting is part of each call's static configuration, so a change takes effect for the
next call even where an earlier one was already traced. The backward always runs the
Triton-lowered kernels.
"""

from __future__ import annotations

import os

import jax

from accel_jax import kernels, kernels_mgpu

CHOICES = ("auto", "triton", "mosaic_gpu", "reference")
# From this many rows the Mosaic GPU fused forward beat the Triton one on every H200 bench
# shape it serves (2-6%); below it (256x4096) it was slower.
MGPU_FUSED_MIN_ROWS = 2048


def backend() -> str:
    """The ACCEL_JAX_BACKEND setting (ValueError naming it when unknown)."""
    value = os.environ.get("ACCEL_JAX_BACKEND", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"ACCEL_JAX_BACKEND must be one of {CHOICES}, got {value!r}")
    return value


def _hopper_or_newer() -> bool:
    try:
        cc = getattr(jax.devices()[0], "compute_capability", None)
        return cc is not None and float(cc) >= 9.0
    except (RuntimeError, ValueError, TypeError):
        return False


def from_mode(mode: str) -> str:
    """The setting carried in an op's mode ("pallas" is auto, "pallas-<choice>" forced)."""
    return mode.partition("-")[2] or "auto"


def forward_kernels(m: int, n: int, fused: bool, dtypes, choice: str = "auto"):
    """The kernels module (``kernels`` or ``kernels_mgpu``) for a compiled (M, N) forward.

    dtypes: every dtype the call reads or writes (x, residual, weight, y, h).
    choice: the ACCEL_JAX_BACKEND setting the call was traced under (``from_mode``).
    """
    if choice in ("triton", "reference") or not kernels_mgpu.supported(m, n, *dtypes):
        return kernels
    if choice == "mosaic_gpu":
        return kernels_mgpu
    if fused and m >= MGPU_FUSED_MIN_ROWS and _hopper_or_newer():
        return kernels_mgpu
    return kernels


__all__ = ["CHOICES", "MGPU_FUSED_MIN_ROWS", "backend", "forward_kernels", "from_mode"]
