"""A pipelined Mosaic GPU forward (rows staged in shared memory by TMA, several blocks in
flight per program) beside the register-load one and the Triton-lowered one, on a GPU.

    python scripts/mgpu_pipeline_probe.py          # values against float64, CUPTI times
    python scripts/mgpu_pipeline_probe.py --lower  # only lower it for CUDA (no GPU needed)

A probe, not a kernel of the package: plain forward, fp32 casting, a weight, no rstd, M a
multiple of rows * programs. Prints per shape and setting the most ulps of y against the
float64 reference and warm / cold device us (CUPTI), with JAX's same-bytes copy.
"""

import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

import accel_jax.kernels_mgpu as KM  # noqa: E402

EPS = 1e-6
F32 = jnp.float32


def pipelined_fwd(x, w, *, rows: int, stages: int, programs: int):
    """y = x * rstd * w, bf16 (M, N), one warpgroup per program over M / programs rows."""
    m, n = x.shape
    vec = KM.vector_len(x.dtype, w.dtype)
    layout = KM._rows_layout(rows, n, vec)
    steps = m // rows // programs
    assert steps * rows * programs == m, (m, rows, programs)

    def kernel(x_gmem, w_gmem, y_gmem):
        pid = lax.axis_index("p")
        wb = KM._weight(w_gmem, rows, n, vec, 0.0)

        def body(_, x_smem, y_smem):
            # blocks travel as (rows, N / 256, 256): an async copy moves <= 256 per dimension
            x_smem, y_smem = x_smem.reshape(rows, n), y_smem.reshape(rows, n)
            xv = KM._load(x_smem, layout).astype(F32)
            rstd = lax.rsqrt(jnp.sum(xv * xv, axis=1) / n + EPS)
            r = KM._broadcast(rstd, (rows, n), (0,), layout)
            y_smem[...] = (xv * (r * wb)).astype(y_smem.dtype)

        spec = plgpu.BlockSpec((rows, n // 256, 256), lambda i: (pid * steps + i, 0, 0))
        plgpu.emit_pipeline(
            body, grid=(steps,), in_specs=[spec], out_specs=[spec], max_concurrent_steps=stages
        )(x_gmem, y_gmem)

    y = plgpu.kernel(
        KM._named(kernel, "rmsnorm_fwd_mgpu_pipelined"),
        out_type=jax.ShapeDtypeStruct((m, n // 256, 256), x.dtype),
        grid=(programs,),
        grid_names=("p",),
        # the automatic barriers kept: the pipeline's TMA store reads what every warp wrote
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(x.reshape(m, n // 256, 256), w)
    return y.reshape(m, n)


def register_fwd(x, w):
    return KM.rmsnorm_fwd(
        x, None, w, eps=EPS, weight_offset=0.0, llama=False, out_dtype=x.dtype,
        round_dtype=x.dtype, store_h=False, store_rstd=False,
    )[0]  # fmt: skip


def triton_fwd(x, w):
    import accel_jax.kernels as KT

    return KT.rmsnorm_fwd(
        x, None, w, eps=EPS, weight_offset=0.0, llama=False, out_dtype=x.dtype,
        round_dtype=x.dtype, store_h=False, store_rstd=False, interpret=False,
    )[0]  # fmt: skip


def max_ulps(y, x, w):
    x64 = np.asarray(x.astype(F32), np.float64)
    ref = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + EPS)
    ref = ref * np.asarray(w.astype(F32), np.float64)
    r = jnp.asarray(ref, F32).astype(y.dtype)
    step = jnp.nextafter(jnp.abs(r), jnp.asarray(jnp.inf, y.dtype)).astype(F32) - jnp.abs(r).astype(
        F32
    )
    return float(jnp.max(jnp.abs(y.astype(F32) - jnp.asarray(ref, F32)) / step))


SETTINGS = [(2, 3, 132), (2, 2, 132), (4, 2, 132), (2, 3, 264), (4, 3, 66), (1, 4, 132)]
if os.environ.get("PROBE_SETTINGS"):  # rows:stages:programs,...
    SETTINGS = [tuple(map(int, s.split(":"))) for s in os.environ["PROBE_SETTINGS"].split(",")]
SHAPES = [(2048, 4096), (8192, 4096), (2048, 8192), (4096, 5120)]
if os.environ.get("PROBE_SHAPES"):  # e.g. 2048x4096,8192x4096
    SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ["PROBE_SHAPES"].split(",")]


def settings_for(m, n):
    for rows, stages, programs in SETTINGS:
        # programs adjusted down to divide the blocks; SMEM: in + out blocks per stage
        blocks = m // rows
        while programs > 1 and blocks % programs:
            programs -= 1
        if 2 * stages * rows * n * 2 <= 200 * 1024 and KM.rows_per_program(n) >= rows:
            yield rows, stages, programs


def main():
    lower_only = "--lower" in sys.argv
    key = jax.random.PRNGKey(0)
    for m, n in SHAPES:
        x = jax.random.normal(key, (m, n), F32).astype(jnp.bfloat16)
        w = (1.0 + 0.2 * jax.random.normal(jax.random.PRNGKey(1), (n,), F32)).astype(jnp.bfloat16)
        if lower_only:
            for rows, stages, programs in settings_for(m, n):
                f = lambda x, w, s=(rows, stages, programs): pipelined_fwd(  # noqa: E731
                    x, w, rows=s[0], stages=s[1], programs=s[2]
                )
                try:
                    jax.export.export(jax.jit(f), platforms=["cuda"])(x, w)
                    print(m, n, (rows, stages, programs), "lowered", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(m, n, (rows, stages, programs), "FAILED", type(e).__name__, str(e)[:300])
            continue
        from tune_jax import copy_us, time_us

        from bench.jax_timing import load_profiler

        measure, why = load_profiler()
        if measure is None:
            raise SystemExit(f"no CUPTI: {why}")
        cw, cc = copy_us(measure, 2 * m * n * 2)
        print(f"{m}x{n}: copy warm {cw:.2f} cold {cc:.2f}", flush=True)
        for name, f in (("triton", triton_fwd), ("registers", register_fwd)):
            y = jax.jit(f)(x, w)
            tw, tc = time_us(measure, f, (x, w))
            print(f"  {name:24s} ulps {max_ulps(y, x, w):.2f}  warm {tw:6.2f} ({cw / tw:4.0%})"
                  f"  cold {tc:6.2f} ({cc / tc:4.0%})", flush=True)  # fmt: skip
        for rows, stages, programs in settings_for(m, n):

            def f(x, w, s=(rows, stages, programs)):
                return pipelined_fwd(x, w, rows=s[0], stages=s[1], programs=s[2])

            label = f"pipelined r{rows} s{stages} p{programs}"
            try:
                y = jax.jit(f)(x, w)
                tw, tc = time_us(measure, f, (x, w))
                print(f"  {label:24s} ulps {max_ulps(y, x, w):.2f}  warm {tw:6.2f} ({cw / tw:4.0%})"
                      f"  cold {tc:6.2f} ({cc / tc:4.0%})", flush=True)  # fmt: skip
            except Exception:  # noqa: BLE001
                print(f"  {label}: FAILED\n" + traceback.format_exc()[-1500:], flush=True)


if __name__ == "__main__":
    main()
