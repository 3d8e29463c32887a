"""Benchmark shapes, operations and the bytes each one moves.

A shape is ``rows x hidden`` (M x N): M rows normalized over a last axis of N elements.
The bytes model counts the activation-sized tensors an ideal kernel must read and write
once (the weight and the per-row statistics are negligible and left out):

- ``fwd``    y = rmsnorm(x):                            read x, write y           -> 2*M*N
- ``fused``  (y, h) = rmsnorm_residual_fused(x, r):     read x, r; write y, h     -> 4*M*N
- ``fwdbwd`` forward, then backward with a given dy:    read x, write y;
                                                        read x, dy, write dx      -> 5*M*N

The floor for each (shape, op) is a device copy of the same bytes: half read, half written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OPS = ("fwd", "fused", "fwdbwd")
OP_TITLES = {
    "fwd": "forward",
    "fused": "fused residual add + forward",
    "fwdbwd": "forward + backward",
}
# Activation-sized tensors moved per op, in units of M*N elements.
ELEMENTS_MOVED = {"fwd": 2, "fused": 4, "fwdbwd": 5}

DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # name -> itemsize in bytes

# The table the project promises (GPU): rows x hidden.
GPU_SHAPES = (
    "2048x4096",  # hidden 4096, seq 2048
    "2048x8192",  # hidden 8192, seq 2048
    "8192x4096",  # hidden 4096, seq 8192
    "4096x5120",
    "4096x7168",
    "4096x16384",
    "32768x2048",
    "256x4096",  # decode-sized
)
# Hidden widths of real models (3072: Llama-3.2-3B, 3584: Qwen2-7B, 4608: Gemma-2-27B,
# 5120: Llama-2-13B / Qwen2.5-14B, 6144: StarCoder2-15B, 7168: DeepSeek-V3) at 4096 rows;
# added to a run by ``python -m bench --widths``.
WIDTH_SHAPES = tuple(f"4096x{n}" for n in (3072, 3584, 4608, 5120, 6144, 7168))
# Without a GPU: small shapes the plain CPU paths handle in a moment.
CPU_SHAPES = ("64x1024", "256x4096")
# Host overhead is measured on one small row, where launch cost dominates.
HOST_OVERHEAD_SHAPE = "1x4096"

# 1 GiB copy (1 GiB read + 1 GiB written) used for the device's reference copy bandwidth.
BIG_COPY_BYTES = 1 << 30


@dataclass(frozen=True, order=True)
class Shape:
    """A 2-D problem: ``rows`` (M) rows of ``hidden`` (N) elements."""

    rows: int
    hidden: int

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.hidden}"

    @property
    def numel(self) -> int:
        return self.rows * self.hidden

    def __str__(self) -> str:
        return self.name


def parse_shape(text: str) -> Shape:
    """Parse ``"MxN"`` (e.g. ``"2048x4096"``) into a Shape; M >= 1 and N >= 1."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"shape {text!r} is not of the form MxN, e.g. 2048x4096")
    rows, hidden = (int(p) for p in parts)
    if rows < 1 or hidden < 1:
        raise ValueError(f"shape {text!r} needs rows >= 1 and hidden >= 1")
    return Shape(rows, hidden)


def parse_shapes(text: str | list[str] | tuple[str, ...]) -> list[Shape]:
    """Parse a comma-separated list (or a sequence) of ``MxN`` shapes, keeping order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    shapes = [parse_shape(t) for t in items if t.strip()]
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def unique_shapes(*groups: list[Shape]) -> list[Shape]:
    """The shapes of ``groups`` in order, each once (its first place kept)."""
    return list(dict.fromkeys(s for group in groups for s in group))


def parse_ops(text: str) -> list[str]:
    """Parse a comma-separated list of ops among ``fwd,fused,fwdbwd``, keeping order."""
    ops = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise ValueError(f"unknown ops {unknown or text!r}; choose from {','.join(OPS)}")
    return ops


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name (``bf16``, ``fp16``, ``fp32``)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bytes_moved(op: str, shape: Shape, dtype: str) -> int:
    """Bytes an ideal implementation of ``op`` reads plus writes at ``shape`` and ``dtype``."""
    if op not in ELEMENTS_MOVED:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return ELEMENTS_MOVED[op] * shape.numel * itemsize(dtype)


def copy_words(total_bytes: int, word_bytes: int = 4) -> int:
    """Number of ``word_bytes`` words a same-bytes copy reads (and writes): total/2, rounded up.

    The floor copy moves ``total_bytes``: half read, half written. Copies use 4-byte words,
    so the copied bytes exceed ``total_bytes / 2`` by less than one word.
    """
    if total_bytes < 0:
        raise ValueError(f"total_bytes must be >= 0, got {total_bytes}")
    return max(1, math.ceil(total_bytes / 2 / word_bytes))
