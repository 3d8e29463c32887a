"""Which kernels run a compiled GPU op: the Triton-lowered ones or Mosaic GPU's.

``ACCEL_JAX_BACKEND`` (read when a call is traced):
- ``auto`` (default): Mosaic GPU for the fused residual forward on compute capability 9.0+
  from ``MGPU_FUSED_MIN_ROWS`` rows, and the Mosaic GPU backward for ``MGPU_BWD_COLS``
  columns from ``MGPU_BWD_MIN_ELEMS`` elements, where each measured faster on the H200
  (bench/NOTES.md); the Triton-lowered kernels for everything else;
- ``triton``: the Triton-lowered kernels only;
- ``mosaic_gpu``: Mosaic GPU for every forward and backward it serves
  (``kernels_mgpu.supported`` / ``supported_bwd``), the Triton-lowered kernels for the rest;
- ``reference``: the plain-jnp reference math everywhere (no kernels).
The setting is part of each call's static configuration, so a change takes effect for the
next call even where an earlier one was already traced; a backward follows the setting its
forward was traced under.
"""

from __future__ import annotations

import os

import jax

from accel_jax import kernels, kernels_mgpu

CHOICES = ("auto", "triton", "mosaic_gpu", "reference")
# From this many rows the Mosaic GPU fused forward beat the Triton one on every H200 bench
# shape it serves (2-6%); below it (256x4096) it was slower.
MGPU_FUSED_MIN_ROWS = 2048
# The Mosaic GPU backward beat the Triton one on the H200 at 8192x2048, 32768x2048,
# 8192x4096 and 4096x5120 (2-10% cold); it tied at 2048x4096 and 4096x3072 and lost on
# 1024 columns and at 256 rows.
MGPU_BWD_COLS = (2048, 5120)
MGPU_BWD_MIN_ELEMS = 2**24


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


def backward_kernels(m: int, n: int, dtypes, choice: str = "auto"):
    """The kernels module for a compiled (M, N) backward (dtypes: dy, x, weight, dh, dx and
    dres's), as forward_kernels chooses."""
    if choice in ("triton", "reference") or not kernels_mgpu.supported_bwd(m, n, *dtypes):
        return kernels
    if choice == "mosaic_gpu":
        return kernels_mgpu
    wins = MGPU_BWD_COLS[0] <= n <= MGPU_BWD_COLS[1] and m * n >= MGPU_BWD_MIN_ELEMS
    return kernels_mgpu if wins and _hopper_or_newer() else kernels


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


__all__ = [
    "CHOICES",
    "MGPU_BWD_COLS",
    "MGPU_BWD_MIN_ELEMS",
    "MGPU_FUSED_MIN_ROWS",
    "backend",
    "backward_kernels",
    "forward_kernels",
    "from_mode",
]
