"""Runs the benchmark: every (shape, op, implementation), the copy floors, host overhead.

``run(config)`` returns the results dictionary that ``bench.report`` prints and writes
(its layout is checked by ``bench.report.validate``). Nothing here fails the run: an implementation
that is missing or raises is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import impls as impls_mod
from bench import jax_timing, timing
from bench.metrics import derive
from bench.shapes import (
    BIG_COPY_BYTES,
    HOST_OVERHEAD_SHAPE,
    OP_TITLES,
    Shape,
    bytes_moved,
    parse_shape,
)

NO_GPU_NOTE = (
    "No CUDA GPU: the kernels need CUDA. Times are CPU wall-clock of the plain CPU paths "
    "(plain torch / jnp) at small shapes, not kernel numbers."
)
CPU_BIG_COPY_BYTES = 64 << 20  # the CPU stand-in for the 1 GiB copy
MIN_FLUSH_BYTES = 128 << 20  # JAX cold runs: smallest L2-flush buffer


@dataclass
class Config:
    """What to run. ``quick`` cuts repetitions (for smoke runs), not shapes."""

    shapes: list[Shape]
    ops: list[str]
    dtype: str = "bf16"
    impls: str | None = None  # comma-separated registry names; None = all
    quick: bool = False
    eps: float = 1e-6
    host_overhead: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def reps(self) -> dict:
        if self.quick:
            return dict(
                warmup_ms=5,
                cold_ms=15,
                warm_ms=5,
                jax_warm=6,
                jax_cold=5,
                host_calls=200,
                cpu_budget_s=0.01,
            )
        return dict(
            warmup_ms=10,
            cold_ms=50,
            warm_ms=20,
            jax_warm=20,
            jax_cold=15,
            host_calls=1000,
            cpu_budget_s=0.05,
        )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of Python and every package whose numbers the results depend on."""
    out = {"python": platform.python_version()}
    for key, dist in [
        ("torch", "torch"),
        ("triton", "triton"),
        ("jax", "jax"),
        ("jaxlib", "jaxlib"),
        ("flax", "flax"),
        ("liger_kernel", "liger-kernel"),
        ("quack_kernels", "quack-kernels"),
        ("cutlass_dsl", "nvidia-cutlass-dsl"),
        ("numpy", "numpy"),
        ("accel_rmsnorm", "accel-rmsnorm"),
    ]:
        out[key] = _version(dist)
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:
        out["cuda"] = None
    return out


def device_info() -> dict:
    """The device the numbers come from: kind ("cuda" or "cpu"), name, L2 size."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "kind": "cuda",
            "name": torch.cuda.get_device_name(0),
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": getattr(props, "total_memory", None),
            "sm_count": getattr(props, "multi_processor_count", None),
        }
    return {
        "kind": "cpu",
        "name": platform.processor() or platform.machine(),
        "l2_bytes": None,
        "memory_bytes": None,
        "sm_count": None,
    }


def _err(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


class _Torch:
    """Torch timing for one device: GPU (do_bench / CUDA graphs) or CPU wall-clock."""

    def __init__(self, on_gpu: bool, reps: dict):
        import torch

        self.torch = torch
        self.on_gpu, self.reps = on_gpu, reps
        self.device = "cuda" if on_gpu else "cpu"

    def sync(self) -> None:
        if self.on_gpu:
            self.torch.cuda.synchronize()

    def times(self, fn: Callable[[], object], notes: list[str]) -> tuple:
        """(cold_us, warm_us); on CPU only a wall-clock time, reported as warm."""
        if not self.on_gpu:
            return None, timing.cpu_wall_us(fn, budget_s=self.reps["cpu_budget_s"])
        cold = warm = None
        try:
            cold = timing.cuda_cold_us(fn, self.reps["warmup_ms"], self.reps["cold_ms"])
        except Exception as e:
            notes.append(f"cold: {_err(e)}")
        try:
            warm = timing.cuda_warm_us(fn, self.reps["warm_ms"])
        except Exception as e:
            notes.append(f"warm (CUDA graph): {_err(e)}")
        return cold, warm

    def floor(self, total_bytes: int) -> dict:
        fn, moved = timing.torch_copy_fn(total_bytes, self.device)
        cold, warm = self.times(fn, [])
        return {"copied_bytes": moved, "cold_us": cold, "warm_us": warm}

    def measure(self, impl, op: str, args: tuple, eps: float) -> dict:
        f = impl.build(op, eps)
        fn = lambda: f(*args)
        rec: dict = {"notes": []}
        rec["first_call_s"] = timing.first_call_s(fn, self.sync)
        rec["cold_us"], rec["warm_us"] = self.times(fn, rec["notes"])
        if op == "fwdbwd" and self.on_gpu:
            rec["peak_mem_bytes"] = timing.torch_peak_bytes(fn)
        return rec

    def host_us(self, impl, op: str, args: tuple, eps: float, calls: int) -> float:
        f = impl.build(op, eps)
        return timing.host_overhead_us(lambda: f(*args), self.sync, calls)

    def release(self) -> None:
        if self.on_gpu:
            self.torch.cuda.empty_cache()


class _Jax:
    """JAX timing: CUPTI kernel records on the GPU, CPU wall-clock otherwise."""

    def __init__(self, on_gpu: bool, reps: dict, l2_bytes: int | None):
        self.on_gpu, self.reps = on_gpu, reps
        self.measure, self.reason = (None, None)
        if on_gpu:
            self.measure, self.reason = jax_timing.load_profiler()
        # Flush several times the L2 (50 MB on an H100), at least MIN_FLUSH_BYTES.
        self.flush_bytes = max(MIN_FLUSH_BYTES, 4 * (l2_bytes or 0))

    def times(self, f: Callable, args: tuple, notes: list[str]) -> tuple:
        """(cold_us, warm_us, kernel names of one call)."""
        if not self.on_gpu:
            fn = jax_timing.blocking(f, args)
            return None, timing.cpu_wall_us(fn, budget_s=self.reps["cpu_budget_s"]), None
        warm, names = jax_timing.warm(self.measure, f, args, self.reps["jax_warm"])
        cold = None
        try:
            cold = jax_timing.cold(
                self.measure, f, args, self.reps["jax_cold"], len(names), self.flush_bytes
            )
        except Exception as e:
            notes.append(f"cold: {_err(e)}")
        return cold, warm, names

    def floor(self, total_bytes: int) -> dict:
        f, args, moved = jax_timing.copy_fn(total_bytes)
        cold, warm, _ = self.times(f, args, [])
        return {"copied_bytes": moved, "cold_us": cold, "warm_us": warm}

    def measure_impl(self, impl, op: str, args: tuple, eps: float) -> dict:
        import jax

        f = impl.build(op, eps)
        rec: dict = {"notes": []}
        t0 = time.perf_counter()
        jax.block_until_ready(jax.jit(f)(*args))
        rec["first_call_s"] = time.perf_counter() - t0
        rec["cold_us"], rec["warm_us"], rec["kernels"] = self.times(f, args, rec["notes"])
        if op == "fwdbwd":
            rec["peak_mem_bytes"] = jax_timing.peak_bytes(f, args)
        return rec

    def host_us(self, impl, op: str, args: tuple, eps: float, calls: int) -> float:
        import jax

        jitted = jax.jit(impl.build(op, eps))
        last: list = [None]

        def call():
            last[0] = jitted(*args)

        return timing.host_overhead_us(call, lambda: jax.block_until_ready(last[0]), calls)


def _jax_reason(on_gpu: bool) -> str | None:
    """Why JAX implementations cannot be timed here (None if they can)."""
    try:
        import jax

        backend = jax.default_backend()
    except Exception as e:
        return f"jax failed to start: {_err(e)}"
    if on_gpu and backend != "gpu":
        return f"jax has no GPU backend here (default backend {backend!r}); install jax[cuda]"
    return None


def _cpu_fallback_paths() -> list[str]:
    """Without a GPU, make the accel packages take their plain (reference) paths."""
    notes = []
    for pkg in ("accel_torch", "accel_jax"):
        try:
            mod = importlib.import_module(pkg)
            mod.set_interpret(False)
            notes.append(f"{pkg}: CPU fallback (reference math), not the kernels")
        except Exception:
            pass
    return notes


def run(cfg: Config) -> dict:
    """Run the benchmark described by ``cfg``; returns the results dictionary."""
    import torch

    on_gpu = torch.cuda.is_available()
    device = device_info()
    reps = cfg.reps
    requested = set((cfg.impls or "").split(","))
    chosen = impls_mod.select(cfg.impls)
    notes: list[str] = []
    if not on_gpu:
        notes.append(NO_GPU_NOTE)
        notes += _cpu_fallback_paths()
        # Intra-op threads waiting on each other made CPU timings erratic on busy machines.
        torch.set_num_threads(1)
        notes.append("CPU run: torch limited to 1 thread for steadier timings")

    jax_reason = _jax_reason(on_gpu) if any(i.framework == "jax" for i in chosen) else None
    tt = _Torch(on_gpu, reps)
    jt = None
    if any(i.framework == "jax" for i in chosen) and jax_reason is None:
        jt = _Jax(on_gpu, reps, device["l2_bytes"])
        if jt.reason:
            jax_reason = f"JAX device timing unavailable ({jt.reason}); no wall-clock fallback"

    impl_info, usable = [], []
    for impl in chosen:
        reason = impl.unavailable(on_gpu, requested=impl.name in requested)
        if reason is None and impl.framework == "jax" and jax_reason:
            reason = jax_reason
        impl_info.append(impl_entry(impl, reason))
        if reason is None:
            usable.append(impl)
        else:
            cfg.log(f"  {impl.name}: missing ({reason})")

    big_copy = _big_copy(tt, on_gpu, cfg.log)
    records: list[dict] = []
    floors: list[dict] = []
    for i, shape in enumerate(cfg.shapes, 1):
        t_shape = time.perf_counter()
        cfg.log(f"[{i}/{len(cfg.shapes)}] {shape} {cfg.dtype}: {', '.join(cfg.ops)} ...")
        for op in cfg.ops:
            _run_cell(cfg, shape, op, chosen, usable, impl_info, tt, jt, records, floors)
        tt.release()
        cfg.log(f"[{i}/{len(cfg.shapes)}] {shape} done in {time.perf_counter() - t_shape:.1f} s")

    host = _host_overhead(cfg, usable, tt, jt, reps) if cfg.host_overhead else []
    return assemble(cfg, device, impl_info, big_copy, floors, records, host, notes)


def impl_entry(impl, reason: str | None) -> dict:
    """The results' description of one implementation and why it is missing (if it is).

    ``op_notes``: per op, how its math differs from the contract's (only ops where it does).
    """
    return {
        "name": impl.name,
        "label": impl.label,
        "framework": impl.framework,
        "project": impl.project,
        "description": impl.description,
        "op_notes": {op: note for op in OP_TITLES if (note := impl.op_note(op))},
        "available": reason is None,
        "reason": reason,
    }


def assemble(cfg, device, impl_info, big_copy, floors, records, host, notes) -> dict:
    """The results dictionary (layout: ``bench.report.TOP_KEYS``), derived metrics filled."""
    derive(records, floors, big_copy.get("gbps"))
    return {
        "schema": "accel-rmsnorm-bench",
        "schema_version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "versions": versions(),
        "dtype": cfg.dtype,
        "eps": cfg.eps,
        "quick": cfg.quick,
        "shapes": [s.name for s in cfg.shapes],
        "ops": list(cfg.ops),
        "op_titles": {op: OP_TITLES[op] for op in cfg.ops},
        "timing": _timing_methods(device["kind"] == "cuda"),
        "copy_bandwidth": big_copy,
        "impls": impl_info,
        "floors": floors,
        "records": records,
        "host_overhead": host,
        "notes": notes,
    }


def _timing_methods(on_gpu: bool) -> dict:
    if not on_gpu:
        return {
            "cold": None,
            "warm": timing.CPU_METHOD,
            "jax_cold": None,
            "jax_warm": timing.CPU_METHOD,
            "host_overhead": timing.HOST_METHOD,
            "peak_memory": None,
            "jax_peak_memory": jax_timing.PEAK_METHOD,
            "copy_floor": "same-bytes copy (int32 dst.copy_(src) / jnp a + s), same timer",
        }
    return {
        "cold": timing.COLD_METHOD,
        "warm": timing.WARM_METHOD,
        "jax_cold": jax_timing.COLD_METHOD,
        "jax_warm": jax_timing.WARM_METHOD,
        "host_overhead": timing.HOST_METHOD,
        "peak_memory": timing.PEAK_METHOD,
        "jax_peak_memory": jax_timing.PEAK_METHOD,
        "copy_floor": "same-bytes copy (torch int32 dst.copy_(src); JAX jitted int32 a + s),"
        " timed like the ops of its framework",
    }


def _big_copy(tt: _Torch, on_gpu: bool, log) -> dict:
    """The reference copy bandwidth: a 1 GiB buffer copied (1 GiB read + 1 GiB written)."""
    buf = BIG_COPY_BYTES if on_gpu else CPU_BIG_COPY_BYTES
    try:
        floor = tt.floor(2 * buf)
    except Exception as e:
        log(f"  reference copy failed: {_err(e)}")
        return {
            "buffer_bytes": buf,
            "bytes_moved": 2 * buf,
            "us": None,
            "gbps": None,
            "error": _err(e),
        }
    us = floor["cold_us"] if on_gpu else floor["warm_us"]
    gbps = floor["copied_bytes"] / us / 1e3 if us else None
    log(f"  reference copy of {buf >> 20} MiB: {us:.1f} us, {gbps:.0f} GB/s")
    tt.release()
    return {
        "buffer_bytes": buf,
        "bytes_moved": floor["copied_bytes"],
        "us": us,
        "gbps": gbps,
        "method": "cold (L2 flushed) median" if on_gpu else timing.CPU_METHOD,
    }


def new_record(impl, shape: Shape, op: str, dtype: str) -> dict:
    """A record for (impl, shape, op) with nothing measured yet (status "ok")."""
    return {
        "impl": impl.name,
        "label": impl.label,
        "framework": impl.framework,
        "project": impl.project,
        "op": op,
        "shape": shape.name,
        "rows": shape.rows,
        "hidden": shape.hidden,
        "dtype": dtype,
        "bytes": bytes_moved(op, shape, dtype),
        "status": "ok",
        "reason": None,
        "cold_us": None,
        "warm_us": None,
        "peak_mem_bytes": None,
        "first_call_s": None,
        "kernels": None,
        "notes": [],
    }


def _run_cell(cfg, shape, op, chosen, usable, impl_info, tt, jt, records, floors) -> None:
    """Floors and every implementation for one (shape, op)."""
    info = {d["name"]: d for d in impl_info}
    nbytes = bytes_moved(op, shape, cfg.dtype)
    for fw, timer in (("torch", tt), ("jax", jt)):
        if timer is None or not any(i.framework == fw for i in usable):
            continue
        try:
            floor = timer.floor(nbytes)
        except Exception as e:
            floor = {"copied_bytes": None, "cold_us": None, "warm_us": None, "error": _err(e)}
        floors.append({"framework": fw, "shape": shape.name, "op": op, "bytes": nbytes, **floor})

    args = {}
    for impl in chosen:
        rec = new_record(impl, shape, op, cfg.dtype)
        records.append(rec)
        reason = info[impl.name]["reason"] or impl.op_unavailable(op)
        if reason:
            rec.update(status="missing", reason=reason)
            continue
        try:
            if impl.framework == "torch":
                if "torch" not in args:
                    args["torch"] = impls_mod.torch_inputs(op, shape, cfg.dtype, tt.device)
                rec.update(tt.measure(impl, op, args["torch"], cfg.eps))
            else:
                if "jax" not in args:
                    args["jax"] = impls_mod.jax_inputs(op, shape, cfg.dtype)
                rec.update(jt.measure_impl(impl, op, args["jax"], cfg.eps))
        except Exception as e:
            rec.update(status="error", reason=_err(e))
            cfg.log(f"  {impl.name} {op} {shape}: error: {rec['reason']}")
            continue
        if rec["cold_us"] is None and rec["warm_us"] is None:
            rec.update(status="error", reason="; ".join(rec["notes"]) or "no time measured")
    args.clear()


def _host_overhead(cfg, usable, tt, jt, reps) -> list[dict]:
    """CPU us per eager (torch) or jitted (JAX) call at the small host-overhead shape."""
    shape = parse_shape(HOST_OVERHEAD_SHAPE)
    cfg.log(f"host overhead at {shape} ...")
    out = []
    for op in cfg.ops:
        args = {}
        for impl in usable:
            if impl.op_unavailable(op):
                continue
            row = {
                "impl": impl.name,
                "label": impl.label,
                "framework": impl.framework,
                "op": op,
                "shape": shape.name,
                "calls": reps["host_calls"],
                "us_per_call": None,
                "status": "ok",
                "reason": None,
            }
            try:
                if impl.framework == "torch":
                    if "torch" not in args:
                        args["torch"] = impls_mod.torch_inputs(op, shape, cfg.dtype, tt.device)
                    row["us_per_call"] = tt.host_us(
                        impl, op, args["torch"], cfg.eps, reps["host_calls"]
                    )
                else:
                    if "jax" not in args:
                        args["jax"] = impls_mod.jax_inputs(op, shape, cfg.dtype)
                    row["us_per_call"] = jt.host_us(
                        impl, op, args["jax"], cfg.eps, reps["host_calls"]
                    )
            except Exception as e:
                row.update(status="error", reason=_err(e))
            out.append(row)
    return out
