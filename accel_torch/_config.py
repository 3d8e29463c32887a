"""Run-time switches shared by the ops: whether kernels run in Triton's interpreter."""

import importlib.util
import os
import sys
import warnings


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _has_triton()

_interpret = os.environ.get("ACCEL_INTERPRET", "0") == "1"
if _interpret and not HAS_TRITON:
    warnings.warn(
        "ACCEL_INTERPRET=1 is ignored: Triton is not installed, so CPU tensors use the "
        "reference math (pip install triton to interpret the kernels)",
        stacklevel=2,
    )
    _interpret = False
if _interpret:
    # Triton reads this when kernels are decorated, so it must be set before kernels.py loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # triton.language's own jit functions (tl.sum, tl.cdiv, ...) are decorated when Triton is
    # imported: imported earlier without TRITON_INTERPRET=1, they cannot be interpreted.
    _standard = sys.modules.get("triton.language.standard")
    if type(getattr(_standard, "sum", None)).__name__ == "JITFunction":
        raise ImportError(
            "ACCEL_INTERPRET=1 needs Triton's interpreter, but Triton was imported before "
            "accel_torch without it: set ACCEL_INTERPRET=1 and TRITON_INTERPRET=1 in the "
            "environment before starting Python, or import accel_torch before triton"
        )


# Triton's interpreter truncates fp32 -> bf16 casts; the kernels then round in software.
SOFT_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


def interpret_enabled() -> bool:
    """True when CPU tensors should run the Triton kernels in Triton's interpreter."""
    return _interpret


def set_interpret(flag: bool) -> None:
    """Switch interpreted kernels on CPU on or off at run time.

    Turning it on only takes effect if ``TRITON_INTERPRET=1`` was set before Triton was
    imported (``ACCEL_INTERPRET=1`` in the environment does that); otherwise a ValueError.
    """
    global _interpret
    if flag and not HAS_TRITON:
        raise ValueError("set_interpret(True) needs Triton, which is not installed")
    if flag and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "set_interpret(True) needs TRITON_INTERPRET=1 before Triton is imported: "
            "start the process with ACCEL_INTERPRET=1"
        )
    _interpret = bool(flag)
