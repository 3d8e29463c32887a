"""Sweep the Pallas kernels' launch parameters on a GPU against JAX's same-bytes copy.

    python scripts/tune_jax.py               # prints one line per (op, shape, setting)
    python scripts/tune_jax.py --widths      # forward and fused at 4096 x 3072 ... 7168
    python scripts/tune_jax.py --columns     # the few-row backward (one launch): warps, stages

Device time from CUPTI (bench.jax_timing), warm and L2-flushed cold, in us. Used to choose
the launch shapes in accel_jax/kernels.py; results go to bench/NOTES.md.

Each setting is timed through a new Python function: ``jax.jit`` keeps traces per
function, so re-jitting the same function after patching a launch constant would time the
first setting again.
"""

import itertools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import accel_jax.kernels as K  # noqa: E402
from bench.jax_timing import cold, copy_fn, load_profiler, warm  # noqa: E402

SHAPES = [(256, 4096), (2048, 4096), (8192, 4096), (2048, 8192), (4096, 7168), (4096, 16384)]
WIDTHS = [(4096, n) for n in (3072, 3584, 4608, 5120, 6144, 7168)]
FEW_ROWS = [(256, 4096), (1024, 4096), (256, 8192)]  # the backward's column programs
FLUSH_BYTES = 256 << 20
CALLS = 20


def time_us(measure, f, args):
    """(warm, cold) device us of a fresh function calling f."""

    def fresh(*a):
        return f(*a)

    us_warm, names = warm(measure, fresh, args, CALLS)

    def fresh_cold(*a):
        return f(*a)

    return us_warm, cold(measure, fresh_cold, args, CALLS, len(names), FLUSH_BYTES)


def copy_us(measure, nbytes):
    f, args, _ = copy_fn(nbytes)
    return time_us(measure, f, args)


def fwd(x, w, r=None):
    return K.rmsnorm_fwd(
        x, r, w, eps=1e-6, weight_offset=0.0, llama=False, out_dtype=x.dtype,
        round_dtype=x.dtype, store_h=r is not None, store_rstd=True, interpret=False,
    )  # fmt: skip


def bwd(dy, x, rstd, w):
    return K.rmsnorm_bwd(
        dy, x, rstd, w, None, weight_offset=0.0, dx_dtype=x.dtype, dres_dtype=None,
        interpret=False,
    )  # fmt: skip


def patched(module, **values):
    """Set module attributes; return a function that restores them."""
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    return lambda: [setattr(module, k, v) for k, v in old.items()]


def sweep_forward(measure, x, w, r=None):
    """The forward (fused with r) over rows per program and warps."""
    (m, n), fused = x.shape, r is not None
    cw, cc = copy_us(measure, (4 if fused else 2) * m * n * 2)
    base = K.fwd_launch(m, n, fused)
    name = "fused" if fused else "fwd"
    print(f"{name} {m}x{n}: copy warm {cw:.1f} cold {cc:.1f}; default {base}", flush=True)
    for rows, warps in itertools.product(sorted({1, 2, base.rows}), (4, 8, 16)):
        launch = K.RowLaunch(base.block_n, rows, base.looped, warps, base.num_stages)
        restore = patched(K, fwd_launch=lambda *_, launch=launch: launch)
        tw, tc = time_us(measure, fwd, (x, w) if r is None else (x, w, r))
        restore()
        print(
            f"  rows={rows} warps={warps}: warm {tw:.1f} ({cw / tw:.0%}) "
            f"cold {tc:.1f} ({cc / tc:.0%})",
            flush=True,
        )


def sweep_bwd_columns(measure, dy, x, rstd, w):
    """The single-launch backward (dweight by column programs) over warps and stages."""
    m, n = x.shape
    real = K._pallas
    for stages, warps in itertools.product((1, 3), (8, 4)):

        def pallas(kernel, name, out_shape, grid, *launch, interpret, w_s=(warps, stages)):
            if name == "rmsnorm_bwd":
                launch = w_s
            return real(kernel, name, out_shape, grid, *launch, interpret=interpret)

        restore = patched(K, _pallas=pallas)
        tw, tc = time_us(measure, bwd, (dy, x, rstd, w))
        restore()
        print(f"bwd {m}x{n} stages={stages} warps={warps}: warm {tw:.2f} cold {tc:.2f}", flush=True)


def main(argv):
    measure, why = load_profiler()
    if measure is None:
        raise SystemExit(f"needs CUPTI on a GPU: {why}")
    print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    if "--widths" in argv:
        for m, n in WIDTHS:
            kx, kr = jax.random.split(jax.random.PRNGKey(0))
            x = jax.random.normal(kx, (m, n), jnp.float32).astype(jnp.bfloat16)
            r = jax.random.normal(kr, (m, n), jnp.float32).astype(jnp.bfloat16)
            w = jnp.ones((n,), jnp.bfloat16)
            sweep_forward(measure, x, w)
            sweep_forward(measure, x, w, r)
        return
    for m, n in FEW_ROWS if "--columns" in argv else SHAPES:
        kx, kd = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (m, n), jnp.float32).astype(jnp.bfloat16)
        dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
        w = jnp.ones((n,), jnp.bfloat16)
        rstd = jax.jit(fwd)(x, w)[2]
        if "--columns" in argv:
            sweep_bwd_columns(measure, dy, x, rstd, w)
            continue

        sweep_forward(measure, x, w)

        cw, cc = copy_us(measure, 3 * m * n * 2)
        print(f"bwd {m}x{n}: copy(3MN) warm {cw:.1f} cold {cc:.1f}", flush=True)
        for cap, warps, chunk in itertools.product((128, 256), (8, 16), (4096, 8192)):
            if chunk < 8192 and n <= 8192:
                continue
            restore = patched(
                K,
                BWD_MAX_PROGRAMS=cap,
                BWD_MAX_PROGRAMS_WIDE=cap,
                BWD_MAX_CHUNK=chunk,
                bwd_num_warps=lambda launch, *_, warps=warps: warps,
            )
            tw, tc = time_us(measure, bwd, (dy, x, rstd, w))
            restore()
            print(
                f"  programs<={cap} warps={warps} chunk={chunk}: warm {tw:.1f} ({cw / tw:.0%}) "
                f"cold {tc:.1f} ({cc / tc:.0%})",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
