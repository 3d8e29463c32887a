# ruff: noqa: B023, E501  (a sweep: each lambda is timed at once, inside its loop)
"""Sweep the Triton kernels' launch parameters on a GPU against a same-bytes copy.

    python scripts/tune_torch.py            # prints one line per (op, shape, setting)
    python scripts/tune_torch.py fwd 2048x4096 8192x4096   # one op, some shapes

Times each setting as the bench does (bench/timing.py): cold = L2 flushed, GPU spin before
the call, CUDA events, median; warm = CUDA-graph replay. Both in us, each beside the
same-bytes copy timed the same way. `*` marks the launch accel_torch uses now. Used to
choose the launch shapes in accel_torch/kernels.py; results go to bench/NOTES.md.
"""

import itertools
import sys

import torch
import triton

import accel_torch
from accel_torch import _config, kernels
from bench.shapes import GPU_SHAPES, parse_shape
from bench.timing import cuda_cold_us, cuda_warm_us


def both(fn):
    """(cold, warm) us of fn()."""
    return cuda_cold_us(fn), cuda_warm_us(fn)


def copy_us(numel_moved, dtype):
    src = torch.empty(numel_moved // 2, dtype=dtype, device="cuda").normal_()
    dst = torch.empty_like(src)
    return both(lambda: dst.copy_(src))


def fwd(x, w, y, rstd, rows, warps, early):
    m, n = x.shape
    block_n, looped = kernels.row_block(n)
    kernels.rmsnorm_fwd_kernel[(triton.cdiv(m, rows),)](
        x, x, w, y, y, rstd, n, n, n, n, m, n, 1e-6, 0.0,
        HAS_RESIDUAL=False, HAS_WEIGHT=True, LLAMA=False, BLOCK_N=block_n, ROWS=rows,
        LOOPED=looped, SOFT_BF16=_config.SOFT_BF16, EARLY_WEIGHT=early, num_warps=warps,
    )  # fmt: skip


def bwd(dy, x, w, rstd, dx, partial, warps, g, prefetch):
    m, n = x.shape
    block_n, chunks, *_ = kernels.bwd_launch(m, n, x.device)
    kernels.rmsnorm_bwd_kernel[(g,)](
        dy, x, w, rstd, dy, dx, dy, partial, n, n, n, n, n, m, n, 0.0,
        HAS_WEIGHT=True, HAS_DH=False, STORE_DRES=False, BLOCK_N=block_n, CHUNKS=chunks,
        SOFT_BF16=_config.SOFT_BF16, PREFETCH=prefetch, num_warps=warps,
    )  # fmt: skip


def line(label, times, copy, default):
    (tc, tw), (cc, cw) = times, copy
    mark = "*" if default else " "
    return f" {mark}{label}: cold {tc:.1f} ({cc / tc:.0%}) warm {tw:.1f} ({cw / tw:.0%})"


def sweep_fwd(x, w, y, rstd, dtype):
    m, n = x.shape
    copy = copy_us(2 * m * n, dtype)
    default = kernels.fwd_launch(m, n)
    block_n, looped = kernels.row_block(n)
    print(
        f"fwd {m}x{n}: copy cold {copy[0]:.1f} warm {copy[1]:.1f}; default "
        f"(BLOCK_N, ROWS, LOOPED, warps, EARLY_WEIGHT) = {default}",
        flush=True,
    )
    for rows, warps, early in itertools.product((1, 2, 4), (4, 8, 16, 32), (False, True)):
        if (looped and rows > 1) or rows * block_n > kernels.MAX_BLOCK_N:
            continue
        if rows * block_n < kernels.FWD_MIN_ELEMS or warps * 512 > 2 * rows * block_n:
            continue  # at least 8 elements per thread
        times = both(lambda: fwd(x, w, y, rstd, rows, warps, early))
        is_default = (block_n, rows, looped, warps, early) == default
        print(
            line(f"rows={rows} warps={warps} early_weight={early}", times, copy, is_default),
            flush=True,
        )


def sweep_bwd(x, w, rstd, dtype):
    m, n = x.shape
    dy, dx = torch.randn_like(x), torch.empty_like(x)
    copy = copy_us(3 * m * n, dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_n, chunks, programs, num_warps, prefetch = kernels.bwd_launch(m, n, x.device)
    print(
        f"bwd {m}x{n} (kernel alone): copy(3MN) cold {copy[0]:.1f} warm {copy[1]:.1f}; "
        f"default (BLOCK_N, CHUNKS, programs, warps, PREFETCH) = "
        f"{(block_n, chunks, programs, num_warps, prefetch)}",
        flush=True,
    )
    for per_sm, warps, pre in itertools.product((1, 2, 4), (4, 8, 16), (False, True)):
        g = min(m, per_sm * sms)
        if chunks == 0 and pre:
            continue
        partial = torch.zeros(g, n, device="cuda", dtype=torch.float32)
        times = both(lambda: bwd(dy, x, w, rstd, dx, partial, warps, g, pre))
        is_default = (g, warps, pre) == (programs, num_warps, prefetch)
        print(
            line(
                f"programs={g} ({per_sm}/SM) warps={warps} prefetch={pre}", times, copy, is_default
            ),
            flush=True,
        )


def public_fwdbwd(x, w, dtype):
    m, n = x.shape
    xg, wg, dy = x.clone().requires_grad_(True), w.clone().requires_grad_(True), torch.randn_like(x)
    copy = copy_us(5 * m * n, dtype)
    tc, tw = both(lambda: torch.autograd.grad(accel_torch.rmsnorm(xg, wg), (xg, wg), dy))
    print(
        f"fwd+bwd (public API) {m}x{n}: cold {tc:.1f} ({tc / copy[0]:.2f}x copy) "
        f"warm {tw:.1f} ({tw / copy[1]:.2f}x)",
        flush=True,
    )


def main(argv):
    ops = [a for a in argv if a in ("fwd", "bwd", "fwdbwd")] or ["fwd", "bwd", "fwdbwd"]
    names = [a for a in argv if "x" in a] or list(GPU_SHAPES)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name} sms={props.multi_processor_count} torch={torch.__version__} "
        f"triton={triton.__version__}",
        flush=True,
    )
    for name in names:
        shape = parse_shape(name)
        m, n = shape.rows, shape.hidden
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        w = torch.randn(n, device="cuda", dtype=dtype)
        y, rstd = torch.empty_like(x), torch.empty(m, device="cuda", dtype=torch.float32)
        _, rows, _, warps, early = kernels.fwd_launch(m, n)
        fwd(x, w, y, rstd, rows, warps, early)  # rstd for the backward
        if "fwd" in ops:
            sweep_fwd(x, w, y, rstd, dtype)
        if "bwd" in ops:
            sweep_bwd(x, w, rstd, dtype)
        if "fwdbwd" in ops:
            public_fwdbwd(x, w, dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
