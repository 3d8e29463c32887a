"""Rows past one warpgroup's registers on Mosaic GPU: G warpgroups per program, each holding
a column slice of the rows (kernels_mgpu's grouped kernels), beside the two-walk kernels and
the Triton-lowered ones, on a GPU.

    python scripts/mgpu_groups_probe.py

Values first (most ulps of y against the float64 reference, the backward's largest |error| /
max |reference| and dweight's bits on a second run) for every setting, then CUPTI device
times (us, warm / cold after a 256 MB L2 flush) with JAX's same-bytes copy. Settings are
kernels_mgpu's constants, read at trace time: GROUP_ROWS, GROUP_ELEMS (forward),
BWD_GROUP_ELEMS, BWD_GROUP_PROGRAMS, BWD_PREFETCH (backward); "two-walk" is GROUPED=False.
"""

import functools
import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from mgpu_check import bwd_call, bwd_values, call, values  # noqa: E402
from tune_jax import copy_us, patched, time_us  # noqa: E402

import accel_jax.kernels as KT  # noqa: E402
import accel_jax.kernels_mgpu as KM  # noqa: E402
from bench.jax_timing import load_profiler  # noqa: E402

BF16 = jnp.bfloat16
FWD_SETTINGS = {  # label: constants
    "two-walk": dict(GROUPED=False),
    "R2 E64": dict(GROUP_ROWS=2, GROUP_ELEMS=64),
    "R2 E128": dict(GROUP_ROWS=2, GROUP_ELEMS=128),
    "R4 E64": dict(GROUP_ROWS=4, GROUP_ELEMS=64),
    "R2 E32": dict(GROUP_ROWS=2, GROUP_ELEMS=32),
}
BWD_SETTINGS = {
    "two-walk": dict(GROUPED=False),
    "E32 P132": dict(BWD_GROUP_ELEMS=32, BWD_GROUP_PROGRAMS=132),
    "E32 P264": dict(BWD_GROUP_ELEMS=32, BWD_GROUP_PROGRAMS=264),
    "E64 P132": dict(BWD_GROUP_ELEMS=64, BWD_GROUP_PROGRAMS=132),
    "E16 P132": dict(BWD_GROUP_ELEMS=16, BWD_GROUP_PROGRAMS=132),
    "E32 P132 F2": dict(BWD_GROUP_ELEMS=32, BWD_GROUP_PROGRAMS=132, BWD_PREFETCH=2),
}
FWD_SHAPES = [(4096, 16384), (2048, 16384), (4096, 12288), (1024, 32768), (4096, 8192 + 1024)]
BWD_SHAPES = [(4096, 16384), (2048, 8192), (4096, 7168), (4096, 6144), (4096, 12288)]


def run(label, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (report and go on: one call, many cases)
        print(f"  {label}: FAILED {type(e).__name__} {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=-4)
        return None


def with_settings(settings, fn):
    restore = patched(KM, **settings)
    try:
        return fn()
    finally:
        restore()


def forward_values():
    print("forward values (max ulps of y vs float64; equal = share bit-equal to Triton)")
    cases = [
        (4098, 16384, BF16, False, False, 0.0, True),
        (1027, 16384, BF16, True, True, 1.0, True),
        (37, 12288, jnp.float16, True, False, 0.0, True),
        (255, 32768, jnp.float32, False, False, 0.0, False),
        (64, 9216, BF16, True, False, 0.0, True),
    ]
    for label, settings in FWD_SETTINGS.items():
        for c in cases:
            groups = with_settings(settings, lambda c=c: KM.fwd_groups(c[1], c[2], c[2]))
            out = run(label, lambda c=c, s=settings: with_settings(s, lambda: values(*c)))
            print(f"  {label:9s} G{groups}", c[:2], jnp.dtype(c[2]).name, c[3:], out, flush=True)


def backward_values():
    print("backward values (max |err| / max |ref|; dweight's bits on a second run)")
    cases = [
        (4097, 16384, BF16, True, False, None, 0.0),
        (1027, 16384, BF16, True, True, jnp.float32, 1.0),
        (33, 7168, jnp.float16, True, False, None, 0.0),
        (257, 12288, jnp.float32, False, True, None, 0.0),
        (130, 8192, BF16, True, False, None, 0.0),
    ]
    for label, settings in BWD_SETTINGS.items():
        for c in cases:
            groups = with_settings(settings, lambda c=c: KM.bwd_groups(c[1], c[2], c[2]))
            out = run(label, lambda c=c, s=settings: with_settings(s, lambda: bwd_values(*c)))
            print(f"  {label:9s} G{groups}", c[:2], jnp.dtype(c[2]).name, c[3:], out, flush=True)


def timed(measure, settings, served, f, args, copy):
    """'warm/cold (shares of the copy)' of f(*args) under settings, or why not."""

    def go():
        if not served():
            return "unsupported"
        t = time_us(measure, jax.jit(f), args)
        return f"{t[0]:.2f}/{t[1]:.2f} ({copy[0] / t[0]:.0%}/{copy[1] / t[1]:.0%})"

    return with_settings(settings, go)


def times(measure):
    print("forward and fused times (us warm/cold, bf16, weight bf16; share of the copy)")
    for m, n in FWD_SHAPES:
        x, r = (jax.random.normal(jax.random.key(i), (m, n)).astype(BF16) for i in (0, 1))
        w = jnp.ones((n,), BF16)
        for fused in (False, True):
            copy = copy_us(measure, (4 if fused else 2) * m * n * 2)
            row = [f"{m}x{n} {'fused' if fused else 'fwd':5} copy {copy[0]:.2f}/{copy[1]:.2f}"]
            args = (x, r if fused else None, w)
            variants = [("triton", {}, KT)] + [(k, s, KM) for k, s in FWD_SETTINGS.items()]
            for label, settings, kern in variants:
                f = functools.partial(call, kern)
                served = functools.partial(KM.supported, m, n, BF16)
                out = run(label, functools.partial(timed, measure, settings, served, f, args, copy))
                g = with_settings(settings, functools.partial(KM.fwd_groups, n, BF16, BF16))
                row.append(f"{label}{'' if kern is KT else f' G{g}'} {out}")
            print("  " + " | ".join(row), flush=True)
    print("backward times (us warm/cold, bf16, weight bf16; copy of 3 M N elements)")
    for m, n in BWD_SHAPES:
        dy, x = (
            jax.random.normal(k, (m, n)).astype(BF16) for k in jax.random.split(jax.random.key(3))
        )
        args = (dy, x, jnp.ones((m,), jnp.float32), jnp.ones((n,), BF16))
        copy = copy_us(measure, 3 * m * n * 2)
        row = [f"{m}x{n} bwd copy {copy[0]:.2f}/{copy[1]:.2f}"]
        variants = [("triton", {}, KT)] + [(k, s, KM) for k, s in BWD_SETTINGS.items()]
        for label, settings, kern in variants:
            f = functools.partial(bwd_call, kern)
            served = functools.partial(KM.supported_bwd, m, n, BF16)
            out = run(label, functools.partial(timed, measure, settings, served, f, args, copy))
            g = with_settings(settings, functools.partial(KM.bwd_groups, n, BF16, BF16))
            row.append(f"{label}{'' if kern is KT else f' G{g}'} {out}")
        print("  " + " | ".join(row), flush=True)


def main():
    print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
    forward_values()
    backward_values()
    measure, why = load_profiler()
    if measure is None:
        raise SystemExit(f"no CUPTI: {why}")
    times(measure)


if __name__ == "__main__":
    main()
