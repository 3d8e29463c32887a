"""Compile every constexpr variant of the Triton kernels for sm_90 (the H100), on any host.

    python -m tests.torch.sm90_compile      # exit status = number of variants that failed

Triton's interpreter, which runs the kernels in CI, never meets Triton's compiler front
end: a kernel can pass every interpreted test and still fail to compile on the GPU (it
happened: a constexpr-dependent early ``return``). ``triton.compile`` with an explicit
target needs no GPU (ptxas ships with Triton). Run it in a process without
TRITON_INTERPRET, which would turn the kernels into interpreted functions.
"""

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from accel_torch import kernels

TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, types: dict[str, str], constexprs: dict[str, object]) -> str | None:
    """None if fn compiles with these argument types and constexprs, else the error."""
    signature = {**types, **dict.fromkeys(constexprs, "constexpr")}
    fixed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=fixed), target=TARGET)
    except Exception as e:  # noqa: BLE001 (report every variant, then fail)
        return f"{type(e).__name__}: {e}"
    return None


def _variants():
    """(name, kernel, types, constexprs): every combination of layout and option (a
    superset of what the ops launch)."""
    for dtype, residual, weight, llama, layout in itertools.product(
        ("bf16", "fp32"), (False, True), (False, True), (False, True),
        ("late", "early", "looped", "parts", "parts_early"),
    ):  # fmt: skip
        looped = layout == "looped"
        p = f"*{dtype}"
        types = dict(X=p, R=p, W=p, Y=p, H=p, RSTD="*fp32", stride_x="i32", stride_r="i32")
        types |= dict(stride_y="i32", stride_h="i32", M="i32", N="i32", eps="fp32")
        types |= dict(weight_offset="fp32")
        block, rows = (kernels.LOOP_BLOCK_N, 1) if looped else (4096, 2)
        parts = kernels.row_parts(7168) if layout.startswith("parts") else (block, 0, 0)
        const = dict(HAS_RESIDUAL=residual, HAS_WEIGHT=weight, LLAMA=llama)
        const |= dict(zip(("BLOCK_N", "BLOCK_N1", "BLOCK_N2"), parts, strict=True))
        const |= dict(
            ROWS=rows, LOOPED=looped, SOFT_BF16=False, EARLY_WEIGHT=layout.endswith("early")
        )
        const |= dict(STORE_RSTD=not residual)
        yield f"fwd {dtype} {const}", kernels.rmsnorm_fwd_kernel, types, const
    for dtype, chunks, prefetch, weight, dh, dw_cols in itertools.product(
        ("bf16", "fp32"), (1, 2, 0), (False, True), (False, True), (False, True), (0, 64)
    ):
        p = f"*{dtype}"
        types = dict(DY=p, X=p, W=p, RSTD="*fp32", DH=p, DX=p, DRES="*fp32", DW_PARTIAL="*fp32")
        types |= {f"stride_{a}": "i32" for a in ("dy", "x", "dh", "dx", "dres")}
        types |= dict(M="i32", N="i32", G="i32", weight_offset="fp32")
        block = kernels.BWD_MAX_BLOCK_N if chunks != 1 else 4096
        const = dict(HAS_WEIGHT=weight, HAS_DH=dh, STORE_DRES=dh, BLOCK_N=block, CHUNKS=chunks)
        const |= dict(SOFT_BF16=False, PREFETCH=prefetch, DW_COLS=dw_cols, DW_ROWS=32)
        yield f"bwd {dtype} {const}", kernels.rmsnorm_bwd_kernel, types, const
    types = dict(DW_PARTIAL="*fp32", DW="*bf16", G="i32", N="i32")
    const = dict(BLOCK_G=256, BLOCK_N=16, SOFT_BF16=False)
    yield "dweight_reduce", kernels.dweight_reduce_kernel, types, const


def main() -> int:
    failed = 0
    for name, fn, types, const in _variants():
        error = _compile(fn, types, const)
        if error:
            failed += 1
            print(f"FAILED {name}\n    {error}", flush=True)
    print(f"{failed} variants failed to compile for {TARGET}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
