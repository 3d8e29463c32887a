"""Which kernels run a compiled GPU op: the Triton-lowered ones or Mosaic GPU's.

``ACCEL_JAX_BACKEND`` (read when a call is traced), or ``use_backend(choice)`` around the
tracing, which wins over the variable:
- ``auto`` (default): Mosaic GPU on compute capability 9.0+ for the fused residual forward
  from ``MGPU_FUSED_MIN_ROWS`` rows (past ``kernels_mgpu.MAX_COLS`` columns only where the
  grouped kernel serves them, ``kernels_mgpu.fwd_groups``), for the
  plain forward at ``MGPU_FWD_COLS`` columns from ``MGPU_FWD_MIN_ELEMS`` elements, and the
  Mosaic GPU backward for ``MGPU_BWD_COLS`` columns from ``MGPU_BWD_MIN_ELEMS`` elements
  (past ``kernels_mgpu.BWD_MAX_COLS`` only where the grouped kernel serves them,
  ``kernels_mgpu.bwd_groups``), where each measured faster on the H200
  (bench/NOTES.md), and only where their loads are 16 bytes wide
  (``kernels_mgpu.full_width``); the Triton-lowered kernels for everything else;
- ``triton``: the Triton-lowered kernels only;
- ``mosaic_gpu``: Mosaic GPU for every forward and backward it serves
  (``kernels_mgpu.supported`` / ``supported_bwd``), the Triton-lowered kernels for the rest;
- ``reference``: the plain-jnp reference math everywhere (no kernels).
The setting is part of each call's static configuration, so a change takes effect for the
next call even where an earlier one was already traced; a backward follows the setting its
forward was traced under. Forcing ``mosaic_gpu`` on a GPU older than compute capability 9.0
(Mosaic GPU needs Hopper) is a ValueError naming the device.

On a JAX without the Pallas Triton backend (deprecated since JAX 0.11), on a Hopper or newer
GPU, ``mosaic_gpu`` runs the Mosaic GPU kernels wherever they serve the shape and ``auto``
too, but for the two-walk kernels (rows past ``MAX_COLS`` / ``BWD_MAX_COLS`` that the grouped
kernels do not split), which lost to XLA's fusion of the reference math on the H200
(4096x16384: forward 86.6 us cold against 85.0, fused 183.6 against 178.8, forward +
backward 244.3 against 202.8); the reference math serves the rest (and everything on older
GPUs). Forcing ``triton`` there is a ValueError naming what is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import jax

from accel_jax import kernels, kernels_mgpu, reference

CHOICES = ("auto", "triton", "mosaic_gpu", "reference")
# From this many rows the Mosaic GPU fused forward beat the Triton one on every H200 bench
# shape it serves (2-6%; the grouped kernel 3-7% at 9216-16384 columns); below it (256x4096)
# it was slower.
MGPU_FUSED_MIN_ROWS = 2048
# The Mosaic GPU plain forward beat the Triton one on the H200 at 4096x4608-4096x7168 (1-4%
# cold, two runs); at 4096 and 8192 columns it tied or lost, at 3072-3584 it lost 6-9%.
MGPU_FWD_COLS = (4608, 7168)
MGPU_FWD_MIN_ELEMS = 2**24
# The Mosaic GPU backward beat the Triton one on the H200 at 8192x2048, 32768x2048,
# 8192x4096 and 4096x5120 (2-10% cold); it tied at 2048x4096 and 4096x3072 and lost on
# 1024 columns and at 256 rows; the grouped backward tied or won at 4096x6144, 2048x8192,
# 4096x7168 and 4096x12288 (up to 5% cold).
MGPU_BWD_COLS = (2048, 12288)
MGPU_BWD_MIN_ELEMS = 2**24


_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "accel_jax_backend", default=None
)


def _checked(value, where: str) -> str:
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in CHOICES:
        raise ValueError(f"{where} must be one of {CHOICES}, got {value!r}")
    return choice


def backend() -> str:
    """The setting in force: ``use_backend``'s innermost block, else ACCEL_JAX_BACKEND
    (default "auto"; ValueError naming it when unknown)."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    return _checked(os.environ.get("ACCEL_JAX_BACKEND", "auto") or "auto", "ACCEL_JAX_BACKEND")


@contextlib.contextmanager
def use_backend(choice: str) -> Iterator[None]:
    """Calls traced inside the block run on ``choice`` (one of CHOICES), over
    ACCEL_JAX_BACKEND; blocks nest. A jitted function keeps the setting it was traced
    under::

        with accel_jax.use_backend("triton"):
            y = jax.jit(accel_jax.rmsnorm)(x, w)
    """
    token = _OVERRIDE.set(_checked(choice, "use_backend's choice"))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def hopper_or_newer() -> bool:
    """True when JAX's first device is an NVIDIA GPU of compute capability 9.0 or newer."""
    try:
        cc = getattr(jax.devices()[0], "compute_capability", None)
        return cc is not None and float(cc) >= 9.0
    except (RuntimeError, ValueError, TypeError):
        return False


def check_forced(choice: str) -> None:
    """ValueError when a forced backend cannot run here: ``mosaic_gpu`` on a GPU older than
    Hopper, ``triton`` on a JAX without the Pallas Triton backend."""
    if choice == "triton" and kernels.UNAVAILABLE is not None:
        raise ValueError(
            f"accel_jax backend 'triton' needs JAX's Pallas Triton backend, which this JAX "
            f"({jax.__version__}) lacks ({kernels.UNAVAILABLE}); use 'auto', 'mosaic_gpu' or "
            "'reference'"
        )
    if choice == "mosaic_gpu" and not hopper_or_newer():
        device = jax.devices()[0]
        cc = getattr(device, "compute_capability", None)
        raise ValueError(
            f"accel_jax backend 'mosaic_gpu' needs an NVIDIA GPU of compute capability 9.0 or "
            f"newer; this device is {device.device_kind!r} (compute capability {cc}); "
            "use 'auto' or 'triton'"
        )


def from_mode(mode: str) -> str:
    """The setting carried in an op's mode ("pallas" is auto, "pallas-<choice>" forced)."""
    return mode.partition("-")[2] or "auto"


def mosaic_gpu_usable() -> bool:
    """Whether compiled Mosaic GPU kernels can run here (this JAX has them, the GPU is
    Hopper or newer)."""
    return kernels_mgpu.UNAVAILABLE is None and hopper_or_newer()


def _fallback():
    """Where a shape no chosen Mosaic GPU kernel serves goes: the Triton-lowered kernels, or
    on a JAX without the Pallas Triton backend the reference math (``reference`` has the
    kernels' signatures)."""
    return kernels if kernels.UNAVAILABLE is None else reference


def backward_kernels(m: int, n: int, dtypes, choice: str = "auto"):
    """The kernels module for a compiled (M, N) backward (dtypes: dy, x, weight, dh, dx and
    dres's), as forward_kernels chooses."""
    if choice in ("triton", "reference") or not kernels_mgpu.supported_bwd(m, n, *dtypes):
        return _fallback()
    if choice == "mosaic_gpu":
        return kernels_mgpu
    # the two-walk kernels of rows past BWD_MAX_COLS lost to the Triton-lowered ones and to
    # XLA's fusion of the reference math (H200)
    two_walk = kernels_mgpu.wide_bwd(n) and not kernels_mgpu.bwd_groups(n, *dtypes)
    if kernels.UNAVAILABLE is not None:
        return reference if two_walk else kernels_mgpu
    wins = MGPU_BWD_COLS[0] <= n <= MGPU_BWD_COLS[1] and m * n >= MGPU_BWD_MIN_ELEMS
    # loads narrower than 16 bytes were never measured against the Triton-lowered kernels
    wins = wins and not two_walk and kernels_mgpu.full_width_bwd(n, *dtypes)
    return kernels_mgpu if wins and hopper_or_newer() else kernels


def forward_kernels(m: int, n: int, fused: bool, dtypes, choice: str = "auto"):
    """The module (``kernels``, ``kernels_mgpu``, or ``reference`` where this JAX has no
    Pallas Triton backend) whose ``rmsnorm_fwd`` runs a compiled (M, N) forward.

    dtypes: every dtype the call reads or writes (x, residual, weight, y, h).
    choice: the ACCEL_JAX_BACKEND setting the call was traced under (``from_mode``).
    Without the Pallas Triton backend, ``auto`` takes the Mosaic GPU kernels wherever they
    serve the shape but for the two-walk kernels, which lost to XLA's fusion of the
    reference math (ops traces kernel calls there only on a GPU that runs them).
    """
    if choice in ("triton", "reference") or not kernels_mgpu.supported(m, n, *dtypes):
        return _fallback()
    if choice == "mosaic_gpu":
        return kernels_mgpu
    # the two-walk kernels of rows past MAX_COLS lost to the Triton-lowered ones and to XLA's
    # fusion of the reference math (H200)
    two_walk = kernels_mgpu.wide(n) and not kernels_mgpu.fwd_groups(n, *dtypes)
    if kernels.UNAVAILABLE is not None:
        return reference if two_walk else kernels_mgpu
    if fused:
        wins = m >= MGPU_FUSED_MIN_ROWS
    else:
        wins = MGPU_FWD_COLS[0] <= n <= MGPU_FWD_COLS[1] and m * n >= MGPU_FWD_MIN_ELEMS
    # loads narrower than 16 bytes were never measured against the Triton-lowered kernels
    wins = wins and not two_walk and kernels_mgpu.full_width(n, *dtypes)
    return kernels_mgpu if wins and hopper_or_newer() else kernels


__all__ = [
    "CHOICES",
    "MGPU_BWD_COLS",
    "MGPU_BWD_MIN_ELEMS",
    "MGPU_FUSED_MIN_ROWS",
    "MGPU_FWD_COLS",
    "MGPU_FWD_MIN_ELEMS",
    "backend",
    "backward_kernels",
    "check_forced",
    "forward_kernels",
    "from_mode",
    "hopper_or_newer",
    "mosaic_gpu_usable",
    "use_backend",
]
