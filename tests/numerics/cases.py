"""The one case table both halves are driven from, and the inputs each case is made of.

A :class:`Case` fixes everything one call needs (shape, dtypes, eps, weight, castings,
fused options, layout, value pattern); :func:`make_inputs` turns it into torch tensors, made
once and then handed to JAX through DLPack, so both halves read the same bytes.
``CPU_CASES`` are small enough for the interpreted kernels; ``REAL_CASES`` are the sizes the
compiled kernels are held to on the H100.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALUE_KINDS = (
    "normal",  # standard normal
    "tiny",  # 1e-15 scale (fp32)
    "huge",  # 1e15 scale (fp32)
    "fp16_max",  # |x| in [3e4, 65504]: squares overflow fp16, not fp32
    "subnormal",  # every input subnormal in its dtype
    "subnormal_out",  # normal rows with a quarter of the elements giving subnormal outputs
    "mixed_rows",  # rows of very different magnitude in one tensor
    "zero_rows",  # some rows all zero
    "nan_row",  # one NaN in one row
    "overflow_row",  # one row whose fp32 sum of squares overflows (PyTorch gives zeros)
)


@dataclass(frozen=True)
class Case:
    """One call of ``rmsnorm`` / ``rmsnorm_residual_fused`` and its inputs.

    ``shape``: x's shape (..., N); ``dtype``: x's dtype name; ``weight``: None (no weight),
    "same" (x's dtype) or a dtype name; ``residual``: dtype name of the residual tensor
    (fused only; default x's dtype); ``residual_dtype``: the argument of that name;
    ``strided``: x is a row-strided view (last axis contiguous) of a wider buffer;
    ``values``: one of VALUE_KINDS; ``scale``: factor on x (and the residual) of "normal"
    values; ``grads``: also check the backward pass.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    weight: str | None = "same"
    eps: float = 1e-6
    weight_offset: float = 0.0
    casting: str = "fp32"
    fused: bool = False
    return_residual: bool = False
    residual: str | None = None
    residual_dtype: str | None = None
    strided: bool = False
    values: str = "normal"
    scale: float = 1.0
    grads: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.values not in VALUE_KINDS:
            raise ValueError(f"unknown value kind {self.values!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    @property
    def needs_subnormals(self) -> bool:
        """Inputs or outputs in fp32's subnormal range (fp16's are normal in fp32)."""
        fp32_range = self.x_dtype in (torch.float32, torch.bfloat16)
        return fp32_range and self.values in ("subnormal", "subnormal_out")

    @property
    def n(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def x_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def w_dtype(self) -> torch.dtype | None:
        if self.weight is None:
            return None
        return self.x_dtype if self.weight == "same" else DTYPES[self.weight]

    @property
    def r_dtype(self) -> torch.dtype:
        return DTYPES[self.residual] if self.residual else self.x_dtype

    @property
    def h_dtype(self) -> torch.dtype:
        """dtype of the fused sum h (= residual_dtype or x's dtype)."""
        return DTYPES[self.residual_dtype] if self.residual_dtype else self.x_dtype

    @property
    def norm_dtype(self) -> torch.dtype:
        """dtype of the tensor being normalized (h when fused, else x)."""
        return self.h_dtype if self.fused else self.x_dtype

    def describe(self) -> str:
        parts = [f"{'x'.join(map(str, self.shape))}", self.dtype]
        if self.weight is None:
            parts.append("noweight")
        elif self.weight != "same":
            parts.append(f"w={self.weight}")
        if self.weight_offset:
            parts.append(f"off={self.weight_offset:g}")
        if self.eps != 1e-6:
            parts.append(f"eps={self.eps:g}")
        if self.casting != "fp32":
            parts.append(self.casting)
        if self.fused:
            parts.append("fused" + ("+h" if self.return_residual else ""))
            if self.residual:
                parts.append(f"r={self.residual}")
            if self.residual_dtype:
                parts.append(f"rdt={self.residual_dtype}")
        if self.strided:
            parts.append("strided")
        if self.values != "normal":
            parts.append(self.values)
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        return " ".join(parts)


@dataclass
class Inputs:
    """Torch tensors of one case, all on one device.

    ``x``: (..., N) (a view of ``x_buffer`` when strided), ``residual``: like x or None,
    ``weight``: (N,) or None, ``dy``: cotangent of y (x's dtype), ``dh``: cotangent of h
    (h's dtype) or None.
    """

    x: torch.Tensor
    x_buffer: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor | None
    dy: torch.Tensor
    dh: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.x_buffer, self.residual, self.weight) if t is not None]


# Row stride of a strided x, in elements beyond N (odd, so rows are also misaligned).
STRIDE_PAD = 7


def _subnormal_scale(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal


def _pattern(case: Case, g: torch.Generator, dtype: torch.dtype, main: bool) -> torch.Tensor:
    """Values of one (rows, N) operand in float64, by the case's value kind.

    ``main`` is True for x (special rows - NaN, overflow - go into x only).
    """
    m, n = case.rows, case.n
    z = torch.randn(m, n, generator=g, dtype=torch.float64)
    kind = case.values
    if kind == "normal":
        z = z * case.scale
    elif kind == "tiny":
        z = z * 1e-15
    elif kind == "huge":
        z = z * 1e15
    elif kind == "fp16_max":
        mag = 3e4 + (65504.0 - 3e4) * torch.rand(m, n, generator=g, dtype=torch.float64)
        z = torch.sign(z) * mag
    elif kind == "subnormal":
        u = 0.01 + 0.98 * torch.rand(m, n, generator=g, dtype=torch.float64)
        z = torch.sign(z) * u * _subnormal_scale(dtype)
    elif kind == "subnormal_out":
        pick = torch.rand(m, n, generator=g) < 0.25
        # x * rstd * w ~ x for unit rows: these land in the subnormal range of the output.
        z = torch.where(pick, z * 0.05 * _subnormal_scale(case.x_dtype), z)
    elif kind == "mixed_rows":
        scales = torch.tensor([1e-3, 1.0, 1e3, 1e-8, 1e8], dtype=torch.float64)
        if dtype == torch.float32 or case.x_dtype == torch.float32:
            scales = torch.tensor([1e-15, 1.0, 1e15, 1e-30, 1e8], dtype=torch.float64)
        if dtype == torch.float16:
            scales = torch.tensor([1e-3, 1.0, 1e2, 1e-1, 1e4], dtype=torch.float64)
        z = z * scales[torch.arange(m) % len(scales)].unsqueeze(-1)
    elif kind == "zero_rows" and m:
        z[:: max(1, m // 3)] = 0.0
    elif kind == "nan_row" and main and m:
        z[m // 2, n // 3] = float("nan")
    elif kind == "overflow_row" and main and m:
        # (1e25)**2 * N overflows fp32 (max 3.4e38) by far; representable in fp32 and bf16.
        z[m // 2] = torch.sign(z[m // 2]) * 1e25
    return z


def make_inputs(case: Case, device: torch.device | str) -> Inputs:
    """Build the case's tensors (deterministic in ``case.seed``) on ``device``."""
    g = torch.Generator().manual_seed(case.seed)
    n, lead = case.n, case.shape[:-1]

    def finish(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return z.to(dtype).reshape(*lead, n).to(device)

    xz = finish(_pattern(case, g, case.x_dtype, True), case.x_dtype)
    if case.strided:
        buf = torch.randn(*lead, n + STRIDE_PAD, generator=g).to(case.x_dtype).to(device)
        buf[..., :n] = xz
        x = buf[..., :n]
    else:
        buf = x = xz
    residual = None
    if case.fused:
        residual = finish(_pattern(case, g, case.r_dtype, False), case.r_dtype)
    weight = None
    if case.w_dtype is not None:
        w = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
        if case.weight_offset == 0.0:
            w = w + 1.0  # Llama-style weights live around 1; Gemma-style (offset 1) around 0
        weight = w.to(case.w_dtype).to(device)
    dy = finish(torch.randn(case.rows, n, generator=g, dtype=torch.float64), case.x_dtype)
    dh = None
    if case.fused and case.return_residual:
        dh = finish(torch.randn(case.rows, n, generator=g, dtype=torch.float64), case.h_dtype)
    return Inputs(x=x, x_buffer=buf, residual=residual, weight=weight, dy=dy, dh=dh)


def _c(name: str, shape, **kw) -> Case:
    return Case(name=name, shape=tuple(shape), **kw)


# Small shapes: every case runs through both interpreted kernels in CI.
CPU_CASES: list[Case] = [
    # dtypes x castings x weight forms
    _c("bf16", (16, 256)),
    _c("fp16", (16, 256), dtype="float16"),
    _c("fp32", (16, 256), dtype="float32"),
    _c("bf16_llama", (16, 256), casting="llama"),
    _c("fp16_llama", (16, 256), dtype="float16", casting="llama"),
    _c("fp32_llama", (8, 256), dtype="float32", casting="llama"),
    _c("bf16_noweight", (16, 256), weight=None),
    _c("fp16_noweight_llama", (8, 256), dtype="float16", weight=None, casting="llama"),
    _c("bf16_gemma", (16, 256), weight_offset=1.0),
    _c("bf16_gemma_llama", (16, 256), weight_offset=1.0, casting="llama"),
    _c("bf16_w32", (16, 256), weight="float32"),
    # eps
    _c("bf16_eps_big", (8, 128), eps=0.1),
    _c("fp32_eps0", (8, 128), dtype="float32", eps=0.0),
    # shapes: N = 1, odd N, 3-D, 0 rows, long rows
    _c("bf16_n1", (5, 1)),
    _c("fp32_n1", (5, 1), dtype="float32"),
    _c("bf16_odd", (7, 1023)),
    _c("fp16_odd", (3, 5, 333), dtype="float16"),
    _c("fp32_odd3d", (2, 3, 77), dtype="float32"),
    _c("bf16_0rows", (0, 256)),
    _c("bf16_0rows_fused", (0, 3, 64), fused=True, return_residual=True),
    _c("bf16_long", (3, 20000)),
    _c("fp32_long_odd", (2, 70001), dtype="float32", seed=1),
    # fused residual
    _c("bf16_fused", (16, 256), fused=True),
    _c("bf16_fused_h", (16, 256), fused=True, return_residual=True),
    _c(
        "fp16_fused_h_llama",
        (8, 320),
        dtype="float16",
        fused=True,
        return_residual=True,
        casting="llama",
    ),
    _c(
        "bf16_fused_r32",
        (16, 256),
        fused=True,
        return_residual=True,
        residual="float32",
        residual_dtype="float32",
    ),
    _c("bf16_fused_rdt32", (16, 256), fused=True, return_residual=True, residual_dtype="float32"),
    _c("fp32_fused_h_odd", (9, 129), dtype="float32", fused=True, return_residual=True),
    _c("bf16_fused_gemma_strided", (16, 200), fused=True, weight_offset=1.0, strided=True),
    # layout
    _c("bf16_strided", (16, 256), strided=True),
    _c("fp32_strided_odd", (4, 3, 99), dtype="float32", strided=True),
    # extreme values
    _c("fp32_tiny", (8, 512), dtype="float32", values="tiny"),
    _c("fp32_tiny_eps0", (8, 512), dtype="float32", values="tiny", eps=0.0),
    _c("fp32_huge", (8, 512), dtype="float32", values="huge"),
    _c("fp16_max", (8, 512), dtype="float16", values="fp16_max"),
    _c(
        "fp16_max_fused",
        (8, 512),
        dtype="float16",
        values="fp16_max",
        fused=True,
        residual_dtype="float32",
        return_residual=True,
    ),
    _c("fp32_subnormal", (8, 256), dtype="float32", values="subnormal"),
    _c("bf16_subnormal", (8, 256), values="subnormal"),
    _c("fp16_subnormal_eps0", (8, 256), dtype="float16", values="subnormal", eps=0.0),
    _c("fp32_subnormal_out", (8, 256), dtype="float32", values="subnormal_out"),
    _c("fp16_subnormal_out", (8, 256), dtype="float16", values="subnormal_out"),
    _c("bf16_subnormal_out", (8, 256), values="subnormal_out"),
    _c("fp32_mixed_rows", (10, 300), dtype="float32", values="mixed_rows"),
    _c("bf16_mixed_rows", (10, 300), values="mixed_rows"),
    _c("fp16_mixed_rows_llama", (10, 300), dtype="float16", values="mixed_rows", casting="llama"),
    # special rows
    _c("bf16_zero_rows", (9, 256), values="zero_rows"),
    _c(
        "fp32_zero_rows_fused",
        (9, 256),
        dtype="float32",
        values="zero_rows",
        fused=True,
        return_residual=True,
    ),
    _c("bf16_nan_row", (8, 256), values="nan_row"),
    _c(
        "fp32_nan_row_fused",
        (8, 256),
        dtype="float32",
        values="nan_row",
        fused=True,
        return_residual=True,
    ),
    # PyTorch's own rms_norm gives this row zeros, and so must we; its backward is NaN
    # (inf * 0), so there is no reference gradient to hold the kernels to.
    _c("fp32_overflow_row", (8, 256), dtype="float32", values="overflow_row", grads=False),
    _c("bf16_overflow_row", (8, 256), values="overflow_row", grads=False),
]

# Real sizes for the compiled kernels on the GPU (2048x4096 ... N = 131072).
REAL_SHAPES = [(2048, 4096), (8192, 4096), (4096, 16384), (256, 65536), (128, 131072)]


def _real_cases() -> list[Case]:
    out: list[Case] = []
    for m, n in REAL_SHAPES:
        tag = f"{m}x{n}"
        out.append(_c(f"real_bf16_{tag}", (m, n)))
        out.append(_c(f"real_bf16_fused_h_{tag}", (m, n), fused=True, return_residual=True))
    m, n = REAL_SHAPES[0]
    tag = f"{m}x{n}"
    out += [
        _c(f"real_fp16_{tag}", (m, n), dtype="float16"),
        _c(f"real_fp32_{tag}", (m, n), dtype="float32"),
        _c(f"real_bf16_llama_{tag}", (m, n), casting="llama"),
        _c(f"real_fp16_llama_{tag}", (m, n), dtype="float16", casting="llama"),
        _c(f"real_bf16_gemma_{tag}", (m, n), weight_offset=1.0),
        _c(f"real_bf16_noweight_{tag}", (m, n), weight=None),
        _c(
            f"real_bf16_fused_r32_{tag}",
            (m, n),
            fused=True,
            return_residual=True,
            residual="float32",
            residual_dtype="float32",
        ),
        _c(f"real_bf16_strided_{tag}", (m, n), strided=True),
        _c(f"real_bf16_nan_row_{tag}", (m, n), values="nan_row"),
        _c(f"real_bf16_zero_rows_{tag}", (m, n), values="zero_rows"),
        _c(f"real_fp32_subnormal_out_{tag}", (m, n), dtype="float32", values="subnormal_out"),
        _c(f"real_fp16_max_{tag}", (m, n), dtype="float16", values="fp16_max"),
        _c(f"real_fp32_huge_{tag}", (m, n), dtype="float32", values="huge"),
        _c("real_fp16_4096x16384", (4096, 16384), dtype="float16"),
        _c(
            "real_fp32_fused_h_8192x4096",
            (8192, 4096),
            dtype="float32",
            fused=True,
            return_residual=True,
        ),
        _c("real_fp32_128x131072", (128, 131072), dtype="float32"),
        _c("real_bf16_odd_4095x4097", (4095, 4097)),
        _c("real_fp32_llama_odd_64x65537", (64, 65537), dtype="float32", casting="llama"),
    ]
    return out


REAL_CASES: list[Case] = _real_cases()


def by_name(cases: list[Case]) -> dict[str, Case]:
    """Index a case list by name (names are unique)."""
    d = {c.name: c for c in cases}
    assert len(d) == len(cases), "case names must be unique"
    return d


def replace(case: Case, **changes) -> Case:
    """A copy of ``case`` with some fields changed."""
    return dataclasses.replace(case, **changes)
