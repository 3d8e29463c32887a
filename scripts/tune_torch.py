# ruff: noqa: B023, E501  (a sweep: each lambda is timed at once, inside its loop)
"""Sweep the Triton kernels' launch parameters on a GPU against a same-bytes copy.

    python scripts/tune_torch.py            # prints one line per (op, shape, config)

Cold timings (L2 flushed, triton.testing.do_bench median, us). Used to choose the launch
shapes in accel_torch/kernels.py; results go to bench/NOTES.md.
"""

import itertools

import torch
import triton
from triton.testing import do_bench

import accel_torch
from accel_torch import _config, kernels

SHAPES = [
    (65536, 256),
    (256, 4096),
    (2048, 4096),
    (8192, 4096),
    (2048, 8192),
    (4096, 16384),
    (32768, 2048),
]


def us(fn):
    return 1000 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_us(numel_moved, dtype):
    src = torch.empty(numel_moved // 2, dtype=dtype, device="cuda").normal_()
    dst = torch.empty_like(src)
    return us(lambda: dst.copy_(src))


def fwd(x, w, y, rstd, rows, warps, early):
    m, n = x.shape
    block_n, looped = kernels.row_block(n)
    kernels.rmsnorm_fwd_kernel[(triton.cdiv(m, rows),)](
        x, x, w, y, y, rstd, n, n, n, n, m, n, 1e-6, 0.0,
        HAS_RESIDUAL=False, HAS_WEIGHT=True, LLAMA=False, BLOCK_N=block_n, ROWS=rows,
        LOOPED=looped, SOFT_BF16=_config.SOFT_BF16, EARLY_WEIGHT=early, num_warps=warps,
    )  # fmt: skip


def bwd(dy, x, w, rstd, dx, partial, warps, g, prefetch=True):
    m, n = x.shape
    block_n, chunks, *_ = kernels.bwd_launch(m, n, x.device)
    kernels.rmsnorm_bwd_kernel[(g,)](
        dy, x, w, rstd, dy, dx, dy, partial, n, n, n, n, n, m, n, 0.0,
        HAS_WEIGHT=True, HAS_DH=False, STORE_DRES=False, BLOCK_N=block_n, CHUNKS=chunks,
        SOFT_BF16=_config.SOFT_BF16, PREFETCH=prefetch, num_warps=warps,
    )  # fmt: skip


def reduce(partial, dw, block_g, block_n, warps):
    g, n = partial.shape
    kernels.dweight_reduce_kernel[(triton.cdiv(n, block_n),)](
        partial, dw, g, n, BLOCK_G=block_g, BLOCK_N=block_n, SOFT_BF16=False, num_warps=warps
    )


def main():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(
        f"{torch.cuda.get_device_name()} sms={sms} torch={torch.__version__} triton={triton.__version__}"
    )
    for m, n in SHAPES:
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        w = torch.randn(n, device="cuda", dtype=dtype)
        y, dy, dx = torch.empty_like(x), torch.randn_like(x), torch.empty_like(x)
        rstd = torch.empty(m, device="cuda", dtype=torch.float32)
        c2, c3 = copy_us(2 * m * n, dtype), copy_us(3 * m * n, dtype)
        rms = us(lambda: torch.nn.functional.rms_norm(x, (n,), w, 1e-6))
        print(
            f"fwd {m}x{n}: copy {c2:.1f} F.rms_norm {rms:.1f}; default "
            f"(BLOCK_N, ROWS, LOOPED, warps, EARLY_WEIGHT) = {kernels.fwd_launch(m, n)}",
            flush=True,
        )
        block_n, looped = kernels.row_block(n)
        for rows, warps, early in itertools.product((1, 2, 4, 8), (4, 8, 16, 32), (False, True)):
            if (looped and rows > 1) or rows * block_n > kernels.MAX_BLOCK_N:
                continue
            t = us(lambda: fwd(x, w, y, rstd, rows, warps, early))
            print(
                f"  fwd rows={rows} warps={warps} early_weight={early}: {t:.1f} us"
                f" = {c2 / t:.0%} of copy",
                flush=True,
            )
        print(f"bwd {m}x{n}: copy(3MN) {c3:.1f}", flush=True)
        for per_sm in (1, 2, 4):
            g = min(m, per_sm * sms)
            partial = torch.zeros(g, n, device="cuda", dtype=torch.float32)
            for warps in (4, 8, 16, 32):
                for prefetch in (False, True):
                    t = us(lambda: bwd(dy, x, w, rstd, dx, partial, warps, g, prefetch))
                    print(
                        f"  bwd per_sm={per_sm} warps={warps} prefetch={prefetch}: {t:.1f} us"
                        f" = {c3 / t:.0%} of copy",
                        flush=True,
                    )
            dw = torch.empty(n, device="cuda", dtype=dtype)
            for block_g, block_n, warps in ((32, 128, 4), (32, 64, 4), (16, 32, 2), (64, 32, 4)):
                t = us(lambda: reduce(partial, dw, block_g, block_n, warps))
                print(
                    f"  reduce g={g} BLOCK_G={block_g} BLOCK_N={block_n} warps={warps}: {t:.1f} us",
                    flush=True,
                )
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        c5 = copy_us(5 * m * n, dtype)
        t = us(lambda: torch.autograd.grad(accel_torch.rmsnorm(xg, wg), (xg, wg), dy))
        print(
            f"fwd+bwd (public API) {m}x{n}: {t:.1f} us, copy(5MN) {c5:.1f}: {t / c5:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
