"""Run-time switches shared by the ops: whether kernels run in Triton's interpreter."""

import os

_interpret = os.environ.get("ACCEL_INTERPRET", "0") == "1"
if _interpret:
    # Triton reads this when kernels are decorated, so it must be set before kernels.py loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    if flag and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "set_interpret(True) needs TRITON_INTERPRET=1 before Triton is imported: "
            "start the process with ACCEL_INTERPRET=1"
        )
    _interpret = bool(flag)
