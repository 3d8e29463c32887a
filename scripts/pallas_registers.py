"""CPU only: registers and spills of `accel_jax`'s single-block backward kernel (N <= 16384),
compiled for sm_90a.

    python scripts/pallas_registers.py M N [NAME=VALUE ...]

Lowers the backward for CUDA on a machine without a GPU, catches the Pallas kernel's Triton
IR at Pallas's lowering step (a private JAX API: `jax._src.pallas.triton.lowering`, JAX
0.10-0.11), compiles that IR with the installed Triton for sm_90a and runs Triton's
bundled ptxas on the PTX. Prints registers per thread, spill bytes and the count of global
loads and stores. ``NAME=VALUE`` sets a module constant of `accel_jax.kernels` first (a
Python expression, e.g. ``BWD_MAX_CHUNK=4096``); ``WARPS=32`` replaces the backward's warp
count. An approximation: on the GPU XLA compiles the same IR with its own Triton and
ptxas (bench/NOTES.md change 17), so confirm any choice there.
"""

import os
import re
import subprocess
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import triton  # noqa: E402
from jax._src.pallas.triton import lowering  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from tune_jax import bwd  # noqa: E402  (scripts/ is on the path of a script)

import accel_jax.kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def capture_triton_ir():
    """Patch Pallas's lowering so that every Triton module it builds is kept as text."""
    modules = []
    lower = lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = keep
    return modules


def apply_settings(settings):
    for setting in settings:
        name, value = setting.split("=", 1)
        if name == "WARPS":
            K.bwd_num_warps = lambda launch, warps=int(value): warps
        else:
            setattr(K, name, eval(value))


def ptxas_report(ttir: str, num_warps: int) -> str:
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    compiled = triton.compile(path, target=TARGET, options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with open(os.path.join(folder, "kernel.ptx"), "w") as f:
        f.write(ptx)
    ptxas = [p for p in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(BIN, p))]
    done = subprocess.run(
        [os.path.join(BIN, ptxas[0]), "-v", "--gpu-name", "sm_90a", f"{folder}/kernel.ptx"]
        + ["-o", f"{folder}/kernel.o"],
        capture_output=True,
        text=True,
    )
    found = re.findall(
        r"Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads", done.stderr
    )
    loads, stores = len(re.findall(r"ld\.global", ptx)), len(re.findall(r"st\.global", ptx))
    return f"{', '.join(found)}; {loads} global loads, {stores} global stores in the PTX"


def main():
    m, n = int(sys.argv[1]), int(sys.argv[2])
    apply_settings(sys.argv[3:])
    modules = capture_triton_ir()
    x = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((n,), jnp.bfloat16)
    rstd = jax.ShapeDtypeStruct((m,), jnp.float32)

    try:  # lowering for CUDA gets past the kernels, then may fail later on a CPU-only jaxlib
        jax.jit(bwd).trace(x, x, rstd, w).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001 (the kernels' IR is already captured)
        print(f"(lowering for cuda stopped after the kernels: {type(e).__name__})")
    if K.row_launch(m, n).looped:
        raise SystemExit(f"N = {n}: only the single-block backward (N <= 16384) is reported")
    warps = K.bwd_num_warps(K.row_launch(m, n))
    for ttir in modules:
        name = re.search(r"tt\.func (?:public )?@(\w+)", ttir).group(1)
        if name == "rmsnorm_bwd":
            report = ptxas_report(ttir, warps)
            print(f"{name} {m}x{n} warps={warps} {' '.join(sys.argv[3:])}: {report}")


if __name__ == "__main__":
    main()
