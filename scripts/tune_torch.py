# ruff: noqa: B023, E501  (a sweep: each lambda is timed at once, inside its loop)
"""Sweep the Triton kernels' launch parameters on a GPU against a same-bytes copy.

    python scripts/tune_torch.py            # prints one line per (op, shape, setting)
    python scripts/tune_torch.py fwd 2048x4096 8192x4096   # one op, some shapes
    python scripts/tune_torch.py --quick fwd fused 4096x5120   # one row per program, no loops
    python scripts/tune_torch.py --dense fwd 4096x5120   # up to 128 elements per thread, no loops

Ops: fwd, fused (forward layouts: padded block, power-of-two parts, looped), bwd (persistent
programs, warps, prefetch), dweight (partials + a reduction kernel against column programs),
fwdbwd (the public API), host (eager host time: direct launches against Triton's, and a
profile), parts (where an eager forward+backward's host time goes; only when asked).

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


def fwd(x, w, y, rstd, parts, rows, looped, warps, early, r=None, h=None):
    m, n = x.shape
    fused = r is not None
    kernels.rmsnorm_fwd_kernel[((m + rows - 1) // rows,)](
        x, r if fused else x, w, y, h if fused else y, rstd, n, n, n, n, m, n, 1e-6, 0.0,
        HAS_RESIDUAL=fused, HAS_WEIGHT=True, LLAMA=False, BLOCK_N=parts[0], BLOCK_N1=parts[1],
        BLOCK_N2=parts[2], ROWS=rows, LOOPED=looped, SOFT_BF16=_config.SOFT_BF16,
        EARLY_WEIGHT=early, STORE_RSTD=True, num_warps=warps,
    )  # fmt: skip


def bwd(dy, x, w, rstd, dx, partial, warps, g, prefetch):
    m, n = x.shape
    block_n, chunks, *_ = kernels.bwd_launch(m, n, x.device)
    kernels.rmsnorm_bwd_kernel[(g,)](
        dy, x, w, rstd, dy, dx, dy, partial, n, n, n, n, n, m, n, g, 0.0,
        HAS_WEIGHT=True, HAS_DH=False, STORE_DRES=False, BLOCK_N=block_n, CHUNKS=chunks,
        SOFT_BF16=_config.SOFT_BF16, PREFETCH=prefetch, DW_COLS=0, DW_ROWS=32, num_warps=warps,
    )  # fmt: skip


def line(label, times, copy, default):
    (tc, tw), (cc, cw) = times, copy
    mark = "*" if default else " "
    return f" {mark}{label}: cold {tc:.1f} ({cc / tc:.0%}) warm {tw:.1f} ({cw / tw:.0%})"


def fwd_layouts(n):
    """(name, parts, looped) of the forward's row layouts for n columns."""
    block_n, looped = kernels.row_block(n)
    if looped:
        return [(f"looped {c}", (c, 0, 0), True) for c in (2048, 4096, 8192)]
    out = [("padded", (block_n, 0, 0), False)]
    if kernels.row_parts(n) != (block_n, 0, 0):
        out.append((f"parts {kernels.row_parts(n)}", kernels.row_parts(n), False))
    if n >= 2048:
        out += [(f"looped {c}", (c, 0, 0), True) for c in (1024, 2048) if c < n]
    return out


def sweep_fwd(x, w, y, rstd, dtype, fused=False):
    m, n = x.shape
    r = h = None
    if fused:
        r, h = torch.randn_like(x), torch.empty_like(x)
    copy = copy_us((4 if fused else 2) * m * n, dtype)
    default = kernels.fwd_launch(m, n, fused)
    print(
        f"{'fused' if fused else 'fwd'} {m}x{n}: copy cold {copy[0]:.1f} warm {copy[1]:.1f}; "
        f"default (parts, ROWS, LOOPED, warps, EARLY_WEIGHT) = {default}",
        flush=True,
    )
    layouts = [lay for lay in fwd_layouts(n) if not ((QUICK or DENSE) and lay[2])]
    per_thread = 128 if DENSE else 64
    for (name, parts, looped), rows, warps, early in itertools.product(
        layouts, (1,) if QUICK else (1, 2), (4, 8) if DENSE else (4, 8, 16), (False, True)
    ):
        width = rows * sum(parts)
        if (looped and (rows > 1 or early)) or width > 2 * kernels.MAX_BLOCK_N:
            continue
        if not looped and rows * parts[0] < kernels.FWD_MIN_ELEMS:
            continue
        if warps * 32 * 4 > rows * parts[0] or warps * 32 * per_thread < width:
            continue  # 4 to 64 (--dense: 128) elements per thread
        times = both(lambda: fwd(x, w, y, rstd, parts, rows, looped, warps, early, r, h))
        is_default = (parts, rows, looped, warps, early) == default
        label = f"{name} rows={rows} warps={warps} early_weight={early}"
        print(line(label, times, copy, is_default), flush=True)


def sweep_bwd_dweight(x, w, dtype):
    """The whole backward (kernels of rmsnorm_bwd_launch) with dweight by partials + a second
    kernel, or by column programs of tiles DW_ROWS x DW_COLS."""
    from accel_torch import launch

    m, n = x.shape
    dy = torch.randn_like(x)
    _, _, rstd = launch.rmsnorm_fwd_launch(x, None, w, 1e-6, 0.0, False, None)
    copy = copy_us(3 * m * n, dtype)
    print(f"bwd dweight {m}x{n}: copy(3MN) cold {copy[0]:.1f} warm {copy[1]:.1f}", flush=True)
    saved = kernels.BWD_COLUMN_ROWS, kernels.BWD_DW_COLS, launch.BWD_DW_ROWS
    settings = [("partials", 0, 64, 32)] + [
        (f"columns {c if n <= 4096 else 2 * c}x{r}", m, c, r)
        for c in (16, 32, 64)
        for r in (16, 32, 64)
    ]
    for name, column_rows, cols, rows in settings:
        kernels.BWD_COLUMN_ROWS, kernels.BWD_DW_COLS, launch.BWD_DW_ROWS = column_rows, cols, rows
        times = both(lambda: launch.rmsnorm_bwd_launch(dy, x, w, rstd, None, 0.0, None))
        is_default = (column_rows >= m, cols, rows) == (saved[0] >= m, *saved[1:])
        print(line(name, times, copy, is_default), flush=True)
    kernels.BWD_COLUMN_ROWS, kernels.BWD_DW_COLS, launch.BWD_DW_ROWS = saved


def host_us(fn, calls=1000):
    """Host us per call of fn, after 200 calls of warm-up (the GPU drained before and after)."""
    import time

    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def host_times():
    """Host us per eager call at 1x4096 bf16: the direct launcher, then Triton's own launch."""
    from accel_torch import launch

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w, r, dy = (
        torch.randn(4096, device="cuda", dtype=x.dtype),
        torch.randn_like(x),
        torch.randn_like(x),
    )
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    _, _, rstd = launch.rmsnorm_fwd_launch(x, None, w, 1e-6, 0.0, False, None)
    calls = {
        "bwd launch": lambda: launch.rmsnorm_bwd_launch(dy, x, w, rstd, None, 0.0, None),
        "F.rms_norm fwd": lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
        "fwd": lambda: accel_torch.rmsnorm(x, w),
        "fused": lambda: accel_torch.rmsnorm_residual_fused(x, r, w, return_residual=True),
        "fwdbwd": lambda: torch.autograd.grad(accel_torch.rmsnorm(xg, wg), (xg, wg), dy),
        "F.rms_norm fwdbwd": lambda: torch.autograd.grad(
            torch.nn.functional.rms_norm(xg, (4096,), wg, 1e-6), (xg, wg), dy
        ),
    }
    launchers = (launch._fwd, launch._bwd, launch._reduce)
    results = {}
    for _ in range(3):  # the two launch modes interleaved: the host's speed drifts
        for direct in (True, False):
            for launcher in launchers:
                launcher.direct = direct
            for name, fn in calls.items():
                us = host_us(fn)
                key = f"{'direct' if direct else 'triton'} {name}"
                results[key] = min(results.get(key, us), us)
    for key, us in results.items():
        print(f"host {key}: {us:.1f} us", flush=True)
    for launcher in launchers:
        launcher.direct = True
    import cProfile
    import pstats

    for name in ("fwd", "fwdbwd"):
        profile = cProfile.Profile()
        profile.runcall(lambda: [calls[name]() for _ in range(2000)])
        print(f"profile of 2000 {name} calls (direct launches):", flush=True)
        pstats.Stats(profile).sort_stats("tottime").print_stats(18)


def host_parts():
    """Where an eager forward+backward's host time goes (1x4096 bf16, direct launches): the
    public call against itself with the forward's or the backward's launches replaced by
    bare allocations, with Python's collector off, and through Tensor.backward; beside
    autograd of two C++ ops and of a Python Function that launches nothing."""
    import gc
    import threading

    from accel_torch import ops

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=x.dtype, requires_grad=True)
    dy = torch.randn_like(x)
    real_fwd, real_bwd = ops.rmsnorm_fwd_launch, ops.rmsnorm_bwd_launch
    threads = set()

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, dy):
            x, w = ctx.saved_tensors
            threads.add(threading.get_ident())
            return torch.empty_like(x), torch.empty_like(w)

    for name, fn in (
        ("grad(x * w)", lambda: torch.autograd.grad(x * w, (x, w), dy)),
        ("Empty Function fwdbwd", lambda: torch.autograd.grad(Empty.apply(x, w), (x, w), dy)),
    ):
        print(f"host parts, {name}: {min(host_us(fn) for _ in range(3)):.1f} us", flush=True)
    print(f"backward on the calling thread: {threads == {threading.get_ident()}}", flush=True)

    def no_fwd(x, residual, weight, *args):
        return torch.empty_like(x), None, x.new_empty(x.shape[:-1], dtype=torch.float32)

    def no_bwd(dy, x, weight, *args):
        return torch.empty_like(dy), None, torch.empty_like(weight)

    def fwdbwd():
        return torch.autograd.grad(accel_torch.rmsnorm(x, w), (x, w), dy)

    def fwd_graph():
        return accel_torch.rmsnorm(x, w)

    def backward():
        accel_torch.rmsnorm(x, w).backward(dy)
        x.grad = w.grad = None

    variants = [
        ("as is", real_fwd, real_bwd, fwdbwd),
        ("no fwd launch", no_fwd, real_bwd, fwdbwd),
        ("no bwd launch", real_fwd, no_bwd, fwdbwd),
        ("no launches", no_fwd, no_bwd, fwdbwd),
        ("Tensor.backward", real_fwd, real_bwd, backward),
        ("fwd with graph", real_fwd, real_bwd, fwd_graph),
        ("fwd with graph, no launch", no_fwd, real_bwd, fwd_graph),
    ]
    for collector in (True, False):
        (gc.enable if collector else gc.disable)()
        for name, f, b, fn in variants:
            ops.rmsnorm_fwd_launch, ops.rmsnorm_bwd_launch = f, b
            us = min(host_us(fn) for _ in range(3))
            print(f"host parts, gc {'on' if collector else 'off'}, {name}: {us:.1f} us", flush=True)
    gc.enable()
    ops.rmsnorm_fwd_launch, ops.rmsnorm_bwd_launch = real_fwd, real_bwd


def sweep_bwd(x, w, rstd, dtype):
    m, n = x.shape
    dy, dx = torch.randn_like(x), torch.empty_like(x)
    copy = copy_us(3 * m * n, dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_n, chunks, programs, num_warps, prefetch, _ = kernels.bwd_launch(m, n, x.device)
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


QUICK = DENSE = False


def main(argv):
    global QUICK, DENSE
    QUICK, DENSE = "--quick" in argv, "--dense" in argv
    ops = [a for a in argv if a in ("fwd", "fused", "bwd", "dweight", "fwdbwd", "host", "parts")]
    ops = ops or ["fwd", "fused", "bwd", "dweight", "fwdbwd", "host"]
    names = [a for a in argv if "x" in a] or list(GPU_SHAPES)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name} sms={props.multi_processor_count} torch={torch.__version__} "
        f"triton={triton.__version__}",
        flush=True,
    )
    if "host" in ops:
        host_times()
    if "parts" in ops:
        host_parts()
    for name in names:
        shape = parse_shape(name)
        m, n = shape.rows, shape.hidden
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        w = torch.randn(n, device="cuda", dtype=dtype)
        y, rstd = torch.empty_like(x), torch.empty(m, device="cuda", dtype=torch.float32)
        fwd(x, w, y, rstd, *kernels.fwd_launch(m, n))  # rstd for the backward
        if "fwd" in ops:
            sweep_fwd(x, w, y, rstd, dtype)
        if "fused" in ops:
            sweep_fwd(x, w, y, rstd, dtype, fused=True)
        if "bwd" in ops:
            sweep_bwd(x, w, rstd, dtype)
        if "dweight" in ops:
            sweep_bwd_dweight(x, w, dtype)
        if "fwdbwd" in ops:
            public_fwdbwd(x, w, dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
