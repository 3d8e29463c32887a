"""Kernel against kernel: `accel_jax`'s Pallas kernels beside `accel_torch`'s Triton kernels,
both timed by CUPTI.

    python scripts/kernel_parity.py            # every bench shape; forward, fused, backward

The bench times each framework its own way (torch: CUDA events or CUDA-graph replay;
JAX: CUPTI kernel records), which is fair against each framework's own copy but not
between the frameworks: events and graph replays include launch gaps that CUPTI kernel
records leave out. Here both sides are CUPTI kernel records (torch through
`torch.profiler`, JAX through `bench.jax_timing`), summed over the kernels of one call
(forward: 1, backward: 2 with the dweight reduction), median over calls; warm = same
inputs, cold = a 256 MB L2 flush before each call (flush kernels left out). The
target: every Pallas kernel within 5% of the Triton kernel; `!` marks a cell over it.
Each side runs in its own process: CUPTI takes one subscriber, and torch's profiler keeps
its subscription once it has run.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from tune_jax import CALLS, FLUSH_BYTES, time_us  # noqa: E402  (scripts/ is on the path)
from tune_jax import bwd as jax_bwd  # noqa: E402
from tune_jax import fwd as jax_fwd  # noqa: E402

import accel_torch.launch as TL  # noqa: E402
from bench.jax_timing import load_profiler  # noqa: E402
from bench.metrics import median  # noqa: E402
from bench.shapes import GPU_SHAPES, parse_shape  # noqa: E402

OURS = ("rmsnorm", "dweight")  # kernel names of both halves contain one of these


def torch_kernel_us(fn, flush=None):
    """Median per-call sum of our kernels' CUPTI times (us) over CALLS calls of fn()."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            if flush is not None:
                flush.zero_()
            fn()
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and any(s in e.name for s in OURS)
    ]
    kernels.sort(key=lambda e: e.time_range.start)
    per_call, rest = divmod(len(kernels), CALLS)
    if rest or not per_call:
        raise RuntimeError(f"{len(kernels)} kernels recorded for {CALLS} calls")
    return median(
        sum(e.time_range.elapsed_us() for e in kernels[i * per_call : (i + 1) * per_call])
        for i in range(CALLS)
    )


def torch_calls(m, n):
    """`accel_torch`'s kernels on bf16 (m, n) inputs: {"fwd" | "fused" | "bwd": call}."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r, dy = (torch.randn(m, n, device="cuda", generator=g).bfloat16() for _ in range(3))
    w = torch.randn(n, device="cuda", generator=g).bfloat16()
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    return {
        "fwd": lambda: TL.rmsnorm_fwd_launch(x, None, w, 1e-6, 0.0, False, None),
        "fused": lambda: TL.rmsnorm_fwd_launch(x, r, w, 1e-6, 0.0, False, torch.bfloat16),
        "bwd": lambda: TL.rmsnorm_bwd_launch(dy, x, w, rstd, None, 0.0, None),
    }


def torch_us(op, m, n):
    call = torch_calls(m, n)[op]
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    return torch_kernel_us(call), torch_kernel_us(call, flush)


def jax_calls(m, n):
    """`accel_jax`'s kernels on bf16 (m, n) inputs: {"fwd" | "fused" | "bwd": (f, args)}."""
    kx, kr, kd, kw = jax.random.split(jax.random.PRNGKey(0), 4)
    x, r, dy = (jax.random.normal(k, (m, n)).astype(jnp.bfloat16) for k in (kx, kr, kd))
    w = jax.random.normal(kw, (n,), jnp.float32).astype(jnp.bfloat16)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1) + 1e-6)
    return {
        "fwd": (jax_fwd, (x, w)),
        "fused": (jax_fwd, (x, w, r)),
        "bwd": (jax_bwd, (dy, x, rstd, w)),
    }


def jax_us(measure, op, m, n):
    """(warm, cold) CUPTI us of one `accel_jax` kernel call (scripts/tune_jax.py's timer)."""
    return time_us(measure, *jax_calls(m, n)[op])


CELLS = [(op, name) for op in ("fwd", "fused", "bwd") for name in GPU_SHAPES]


def side(which):
    """Print one JSON line: {"op shape": [warm, cold]} for one framework."""
    measure, why = load_profiler()
    if measure is None:
        raise SystemExit(f"needs CUPTI on a GPU: {why}")
    times = {}
    for op, name in CELLS:
        shape = parse_shape(name)
        if which == "torch":
            times[f"{op} {name}"] = torch_us(op, shape.rows, shape.hidden)
        else:
            times[f"{op} {name}"] = jax_us(measure, op, shape.rows, shape.hidden)
    print(json.dumps(times))


def run_side(which):
    done = subprocess.run([sys.executable, __file__, which], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {which} side failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "jax", jax.__version__)
    jax_times, torch_times = run_side("jax"), run_side("torch")
    print("op     shape        torch warm/cold   jax warm/cold    jax/torch warm, cold")
    for op, name in CELLS:
        (tw, tc), (jw, jc) = torch_times[f"{op} {name}"], jax_times[f"{op} {name}"]
        marks = ["!" if j / t > 1.05 else " " for j, t in ((jw, tw), (jc, tc))]
        print(
            f"{op:6} {name:11} {tw:7.1f} /{tc:7.1f}   {jw:7.1f} /{jc:7.1f}   "
            f"{jw / tw:5.2f}{marks[0]} {jc / tc:5.2f}{marks[1]}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        side(sys.argv[1])
    else:
        main()
