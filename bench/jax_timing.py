"""JAX-side timing: device time from CUPTI kernel records, never a Python wall-clock loop.

``jax.experimental.mosaic.gpu.profiler.measure(f, aggregate=False, iterations=n)`` runs the
jitted ``f`` n times after one warm-up call and returns, per call, the list of
``(kernel name, ms)`` that CUPTI recorded. One call's time is the sum of all its kernels:
XLA's extra fusions around a custom kernel are part of what the user pays for.

- warm: the same inputs every call (L2-resident when they fit), median over calls;
- cold: each call first runs a flush kernel (``buf ^ s`` over a buffer of several times the
  L2 size) that the op's inputs depend on through ``lax.optimization_barrier``; the flush
  kernel is recognized by name (from a run of the flush alone) and left out.

Kernel sums exclude the gaps between kernels, so a many-kernel op looks slightly better
here than under torch's CUDA-graph replay; the kernel names are kept in the results.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence

from bench.metrics import median
from bench.shapes import copy_words

KernelRecords = list[tuple[str, float]]  # one call: (kernel name, ms) in launch order

WARM_METHOD = "CUPTI kernel records (mosaic.gpu.profiler.measure), same inputs, median (us)"
COLD_METHOD = (
    "CUPTI kernel records, each call preceded by an L2-flush kernel the inputs depend on "
    "(flush kernel excluded by name), median (us)"
)
PEAK_METHOD = (
    "XLA compiled memory analysis of the jitted call: peak minus argument bytes (device "
    "memory_stats has no per-call peak reset)"
)


def load_profiler() -> tuple[Callable | None, str | None]:
    """``(measure, None)`` if the CUPTI profiler imports, else ``(None, reason)``."""
    try:
        from jax.experimental.mosaic.gpu import profiler
    except Exception as e:  # missing module or a jaxlib built without Mosaic GPU
        return None, f"jax.experimental.mosaic.gpu.profiler: {type(e).__name__}: {e}"
    if not hasattr(profiler, "measure"):
        return None, "jax.experimental.mosaic.gpu.profiler has no measure()"
    return profiler.measure, None


def call_records(measure: Callable, jitted: Callable, args: Sequence, calls: int) -> list:
    """Kernel records of ``calls`` calls of ``jitted(*args)``: a list (per call) of records."""
    params = inspect.signature(measure).parameters
    kwargs: dict = {"aggregate": False}
    if "mode" in params:  # some jax versions select CUPTI with mode=
        kwargs["mode"] = "cupti"
    if "iterations" in params:
        _, timings = measure(jitted, iterations=calls, **kwargs)(*args)
        per_call = [timings] if calls == 1 else timings
    else:
        per_call = [measure(jitted, **kwargs)(*args)[1] for _ in range(calls)]
    if per_call is None or any(t is None for t in per_call):
        raise RuntimeError("CUPTI recorded no kernels for this function")
    return [[(str(name), float(ms)) for name, ms in records] for records in per_call]


def call_us(per_call: Sequence[KernelRecords]) -> list[float]:
    """Device us of each call: the sum of its kernels' times."""
    return [1e3 * sum(ms for _, ms in records) for records in per_call]


def _base_name(name: str) -> str:
    """A kernel name without XLA's uniquifying suffixes (``fusion.2`` / ``fusion_2``)."""
    return re.sub(r"([._]\d+)+$", "", name)


def drop_kernels(records: KernelRecords, names: Sequence[str]) -> KernelRecords:
    """``records`` without one occurrence (the earliest) of each kernel named in ``names``.

    A name matches exactly or, failing that, up to XLA's numeric suffixes. Raises
    ValueError if a name is absent: the flush was not where it was expected.
    """
    out = list(records)
    for name in names:
        idx = next((i for i, (n, _) in enumerate(out) if n == name), None)
        if idx is None:
            base = _base_name(name)
            idx = next((i for i, (n, _) in enumerate(out) if _base_name(n) == base), None)
        if idx is None:
            raise ValueError(f"kernel {name!r} not found among {[n for n, _ in out]}")
        del out[idx]
    return out


def warm(measure: Callable, f: Callable, args: Sequence, calls: int) -> tuple[float, list[str]]:
    """Median warm device us of ``jax.jit(f)(*args)`` and the kernel names of one call."""
    import jax

    per_call = call_records(measure, jax.jit(f), args, calls)
    return median(call_us(per_call)), [n for n, _ in per_call[0]]


@functools.lru_cache(maxsize=2)
def _flush_state(flush_bytes: int):
    """The flush buffer and salt, made once per size (kept for the run)."""
    import jax.numpy as jnp

    buf = jnp.ones((flush_bytes // 4,), jnp.int32)
    salt = jnp.asarray(0x5A5A, jnp.int32)  # a runtime scalar: XLA cannot fold the xor away
    return buf, salt


@functools.lru_cache(maxsize=4)
def _flush_names(measure: Callable, flush_bytes: int) -> tuple[str, ...]:
    """Kernel names of the flush alone, built like the flushed call (same barrier)."""
    import jax

    flush_only = jax.jit(lambda b, s: jax.lax.optimization_barrier((b ^ s, ()))[0])
    records = call_records(measure, flush_only, _flush_state(flush_bytes), 1)[0]
    return tuple(n for n, _ in records)


def cold(
    measure: Callable,
    f: Callable,
    args: Sequence,
    calls: int,
    kernels_per_call: int,
    flush_bytes: int,
) -> float:
    """Median cold device us of ``f(*args)``: each call after an L2 flush, flush excluded.

    ``kernels_per_call`` (from the warm run) checks that what is left is exactly the op.
    """
    import jax

    buf, salt = _flush_state(flush_bytes)
    flush_names = _flush_names(measure, flush_bytes)

    def flushed_call(b, s, *a):
        # The op's inputs pass through the barrier with the flush's output, so every kernel
        # that reads them runs after the flush. The flushed buffer is returned to keep it live.
        flushed, a = jax.lax.optimization_barrier((b ^ s, a))
        return flushed, f(*a)

    per_call = call_records(measure, jax.jit(flushed_call), (buf, salt, *args), calls)
    op_only = [drop_kernels(records, flush_names) for records in per_call]
    counts = {len(r) for r in op_only}
    if counts != {kernels_per_call}:
        raise RuntimeError(
            f"cold run has {sorted(counts)} kernels per call besides the flush, "
            f"warm run has {kernels_per_call}: cannot separate the op"
        )
    return median(call_us(op_only))


def copy_fn(total_bytes: int) -> tuple[Callable, tuple, int]:
    """A same-bytes elementwise copy ``a + s`` (int32 words): function, args, bytes moved."""
    import jax.numpy as jnp

    words = copy_words(total_bytes)
    a = jnp.ones((words,), jnp.int32)
    s = jnp.asarray(0, jnp.int32)  # runtime scalar: keeps the add (and so the copy) real
    return (lambda a_, s_: a_ + s_), (a, s), 8 * words


def peak_bytes(f: Callable, args: Sequence) -> int | None:
    """Peak device bytes of one jitted call above its arguments, from XLA's memory analysis."""
    import jax

    try:
        stats = jax.jit(f).lower(*args).compile().memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
    if peak > 0:
        return int(peak - stats.argument_size_in_bytes)
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def blocking(f: Callable, args: Sequence) -> Callable[[], object]:
    """A zero-argument call of ``jax.jit(f)(*args)`` that waits for the result (CPU timing)."""
    import jax

    jitted = jax.jit(f)
    return lambda: jax.block_until_ready(jitted(*args))
