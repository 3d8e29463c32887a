"""Torch-side timing: cold and warm device time, the copy floor, host overhead, memory.

On a CUDA device (the numbers the project quotes):
- cold: as ``triton.testing.do_bench`` (a 256 MB write flushes L2 before every call; median
  of the calls, timed with CUDA events), plus a GPU spin between flush and call so that the
  host has queued the whole call before the GPU reaches it: device time, without the launch
  gaps of a slow host (host overhead is measured on its own, ``host_overhead_us``);
- warm: ``triton.testing.do_bench_cudagraph`` (the calls replayed from a CUDA graph with
  L2-resident inputs; median of the replays).
Without a GPU only a CPU wall-clock median exists (``cpu_wall_us``), labelled as such.
All results are microseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.metrics import median
from bench.shapes import copy_words

COLD_METHOD = (
    "CUDA events around each call, L2 flushed by a 256 MB write before it (as triton.testing."
    "do_bench) and a 1 ms GPU spin after the flush so the host has queued the call: device "
    "time without host launch gaps; median (us)"
)
FLUSH_BYTES = 256 * 2**20  # triton.testing.do_bench's L2 flush
SPIN_CYCLES = 2_000_000  # about 1 ms at H100 clocks: more than any eager call's host time
WARM_METHOD = "triton.testing.do_bench_cudagraph: CUDA-graph replay, L2-resident inputs, median"
CPU_METHOD = "CPU wall-clock (time.perf_counter), median per call, caches not flushed"
HOST_METHOD = (
    "CPU us per call: N back-to-back calls timed with time.perf_counter, device synchronized "
    "once at the end only"
)
PEAK_METHOD = (
    "torch.cuda.max_memory_allocated during one call minus memory_allocated before it "
    "(inputs x, w, dy excluded; outputs and saved activations included)"
)


def cuda_cold_us(fn: Callable[[], object], warmup_ms: int = 10, rep_ms: int = 50) -> float:
    """Median device time (us) of ``fn()`` with L2 flushed before each call.

    Like ``triton.testing.do_bench`` (flush, event, call, event; median), but the GPU spins
    between the flush and the start event, so a call whose host side is slower than its
    kernels is still timed on the device alone. ``rep_ms`` sets the number of calls from an
    estimate of one call's time, as do_bench does.
    """
    import torch

    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = max(1e-3, 1e3 * (time.perf_counter() - t0))
    calls = int(max(10, min(200, rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * median([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def cuda_warm_us(fn: Callable[[], object], rep_ms: int = 20) -> float:
    """Median device time (us) of ``fn()`` replayed from a CUDA graph, inputs L2-resident."""
    from triton.testing import do_bench_cudagraph

    return 1e3 * float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def cpu_wall_us(fn: Callable[[], object], min_calls: int = 5, budget_s: float = 0.05) -> float:
    """Median wall-clock us of ``fn()`` (after one warm-up call); ``fn`` must block."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
        if len(times) >= 10_000:
            break
    return median(times)


def host_overhead_us(
    fn: Callable[[], object], sync: Callable[[], object], calls: int = 1000, warmup: int = 20
) -> float:
    """CPU us per call of ``fn`` issued back to back, with ``sync()`` once at the end only.

    At a small shape the device finishes each call before the host issues the next, so this
    is the host's cost of one call (argument checks, dispatch, launch).
    """
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return 1e6 * (time.perf_counter() - t0) / calls


def torch_copy_fn(total_bytes: int, device: str) -> tuple[Callable[[], object], int]:
    """A same-bytes copy: ``dst.copy_(src)`` moving ``total_bytes`` (half read, half written).

    Returns the zero-argument function and the bytes it actually moves (4-byte words).
    """
    import torch

    words = copy_words(total_bytes)
    src = torch.empty(words, dtype=torch.int32, device=device).fill_(1)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 8 * words


def torch_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CUDA bytes allocated during one ``fn()`` above what was allocated before it."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def first_call_s(fn: Callable[[], object], sync: Callable[[], object]) -> float:
    """Seconds of the first call (compilation, autotuning and JIT included)."""
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0
