"""Time the kernels of both halves, and `accel_torch`'s under JAX's cache split.

    python scripts/carveout_check.py

XLA launches Pallas's Triton kernels preferring shared memory: Nsight Compute reports
`CachePreferShared` and a 233 KB shared-memory configuration for `accel_jax`'s backward,
leaving about 23 KB of the SM's 256 KB to L1, against `CachePreferNone` and 33 KB for the
same Triton kernel launched by `accel_torch`. Rows of more than 8192 columns are walked
twice by the backward (the second pass reloads x and dy, expected to hit L1).

XLA does this for every kernel launched with dynamic shared memory, which every Triton
kernel that reduces across warps has: `CudaKernel::UpdateMaxDynamicSharedMemoryBytes` in
XLA's `stream_executor/cuda/cuda_kernel.cc` calls `cuFuncSetCacheConfig(...,
CU_FUNC_CACHE_PREFER_SHARED)` the first time a launch asks for more dynamic shared memory
than the function's recorded maximum (initially none).

This script times, in us (warm: CUDA-graph replay / same inputs; cold: L2 flushed):
  * `accel_torch`'s forward and backward with the driver's default split, then with the
    function set to prefer shared memory (carveout 100%, `cuFuncSetAttribute`), then
    default again (bench/timing.py's timers: the host's launch time stays out);
  * `accel_jax`'s forward and backward (CUPTI device time, bench.jax_timing).
If `accel_torch` under the shared-memory split runs as slowly as `accel_jax`, the split
explains the gap between the two halves. Results: bench/NOTES.md.
"""

import ctypes
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import torch  # noqa: E402
from kernel_parity import jax_us, torch_calls  # noqa: E402  (scripts/ is on the path)

from accel_torch.kernels import rmsnorm_bwd_kernel, rmsnorm_fwd_kernel  # noqa: E402
from bench.jax_timing import load_profiler  # noqa: E402
from bench.timing import cuda_cold_us, cuda_warm_us  # noqa: E402

SHAPES = {
    "fwd": [(4096, 16384), (2048, 8192), (8192, 4096)],
    "bwd": [(4096, 16384), (4096, 12288), (2048, 8192)],
}
KERNELS = {"fwd": rmsnorm_fwd_kernel, "bwd": rmsnorm_bwd_kernel}
CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9


def compiled_kernels(jit_fn):
    """The compiled kernels a Triton JITFunction holds (its cache layout varies by version)."""
    found = []

    def visit(obj, depth=0):
        if hasattr(obj, "asm") and hasattr(obj, "function"):
            found.append(obj)
        elif isinstance(obj, dict) and depth < 4:
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (tuple, list)) and depth < 4:
            for v in obj:
                visit(v, depth + 1)

    visit(getattr(jit_fn, "device_caches", None) or getattr(jit_fn, "cache", {}))
    return found


def set_carveout(jit_fn, percent):
    """Preferred shared-memory carveout of every compiled kernel of jit_fn (-1: default)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    for kernel in compiled_kernels(jit_fn):
        kernel._init_handles()
        rc = cuda.cuFuncSetAttribute(
            ctypes.c_void_p(kernel.function),
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            percent,
        )
        if rc != 0:
            raise RuntimeError(f"cuFuncSetAttribute returned {rc}")


def torch_us(op, m, n):
    call = torch_calls(m, n)[op]
    call()
    torch.cuda.synchronize()
    times = {}
    for label, percent in (("default", -1), ("prefer shared", 100), ("default again", -1)):
        set_carveout(KERNELS[op], percent)
        times[label] = (cuda_warm_us(call, rep_ms=100), cuda_cold_us(call, rep_ms=200))
    set_carveout(KERNELS[op], -1)
    return times


def main():
    measure, why = load_profiler()
    if measure is None:
        raise SystemExit(f"needs CUPTI on a GPU: {why}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "jax", jax.__version__)
    for op, shapes in SHAPES.items():
        for m, n in shapes:
            times = torch_us(op, m, n)
            cells = [f"{label} {w:.1f}/{c:.1f}" for label, (w, c) in times.items()]
            jw, jc = jax_us(measure, op, m, n)
            print(f"{op} {m}x{n} warm/cold us: accel_torch " + ", ".join(cells), end="")
            print(f"; accel_jax {jw:.1f}/{jc:.1f}", flush=True)


if __name__ == "__main__":
    main()
