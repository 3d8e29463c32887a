"""Timing one model step: CUDA events on a GPU, CPU wall-clock elsewhere; peak memory.

A step here is milliseconds of work (a training step, a decode step), so no L2 flush:
the weights alone are many times the L2. On a GPU: CUDA events around each of ``steps``
back-to-back steps after ``warmup`` untimed ones, median. Back to back, an eager step whose
host side is slower than its kernels (small decode batches) is timed with its launch gaps:
what an eager user waits for. The device-busy time comes from the profiler instead.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import timing
from bench.metrics import median

EVENTS_METHOD = (
    "CUDA events around each step, steps back to back after warm-up steps, median (ms); "
    "eager launch gaps included"
)
CPU_METHOD = timing.CPU_METHOD
PEAK_METHOD = (
    "torch.cuda.max_memory_allocated over one step after reset_peak_memory_stats (weights "
    "included; gradients set to None before the step), and the part above memory_allocated "
    "before the step"
)


def step_ms(fn: Callable[[], object], steps: int, warmup: int) -> tuple[float, str]:
    """Median ms of ``fn()`` and how it was timed (CUDA events, or CPU wall-clock)."""
    import torch

    if not torch.cuda.is_available():
        return timing.cpu_wall_us(fn, min_calls=steps, budget_s=0.0) / 1e3, CPU_METHOD
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)), EVENTS_METHOD


def peak_memory(fn: Callable[[], object]) -> dict:
    """``peak_bytes`` (max allocated during one ``fn()``, all live tensors included) and
    ``above_bytes`` (the part above what was allocated before it); None off CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_bytes": None, "above_bytes": None}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    above = timing.torch_peak_bytes(fn)
    return {"peak_bytes": before + above, "above_bytes": above}


def measure(
    rec: dict,
    step: Callable[[], object],
    norms,
    trace,
    cfg_steps: int,
    warmup: int,
    profiled_steps: int = 1,
) -> None:
    """Fill ``rec`` with ``step``'s time, peak memory and norm profile; status "ok"."""
    from bench.model.profile_torch import profile_norms

    rec["step_ms"], rec["timing"] = step_ms(step, cfg_steps, warmup)
    rec.update(peak_memory(step))
    rec["profile"] = profile_norms(step, norms, trace, profiled_steps, rec.get("variant"))
    rec["status"] = "ok"
