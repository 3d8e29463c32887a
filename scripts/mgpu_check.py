"""The Mosaic GPU forward beside the Triton-lowered one, on a GPU: values, then CUPTI times.

    python scripts/mgpu_check.py            # the forward: every bench and width shape, bf16
    python scripts/mgpu_check.py --bwd      # the backward, and a sweep of its G and U

Forward values: y, h and rstd of both kernels against the float64 reference of the same rounded
inputs (most ulps of y's dtype, rstd's relative error) and how many y elements the two
kernels give bit-equal. Times: device us per call by CUPTI kernel records (warm, and cold
after a 256 MB L2 flush), and JAX's same-bytes copy timed the same way. Backward values: the
largest |dx - ref| and |dweight - ref| of both kernels in units of the float64 reference's
scale, and whether dweight has the same bits on a second run.
"""

import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tune_jax import bwd, copy_us, patched, time_us  # noqa: E402

import accel_jax.kernels as KT  # noqa: E402
import accel_jax.kernels_mgpu as KM  # noqa: E402
from bench.jax_timing import load_profiler  # noqa: E402
from bench.shapes import GPU_SHAPES, WIDTH_SHAPES, parse_shape  # noqa: E402

EPS = 1e-6


def call(kernels, x, r, w, llama=False, offset=0.0):
    args = dict(eps=EPS, weight_offset=offset, llama=llama, out_dtype=x.dtype)
    args.update(round_dtype=x.dtype if r is None else r.dtype, store_h=r is not None)
    if kernels is KT:
        args["interpret"] = False
    return kernels.rmsnorm_fwd(x, r, w, store_rstd=True, **args)


def reference(x, r, w, llama, offset):
    """float64 y, h (rounded to h's dtype) and rstd from the same rounded inputs."""
    h = x if r is None else (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)
    h64 = np.asarray(h.astype(jnp.float32), np.float64)
    rstd = 1.0 / np.sqrt(np.mean(h64 * h64, axis=-1) + EPS)
    xhat = h64 * rstd[:, None]
    w64 = np.asarray(w.astype(jnp.float32), np.float64) + offset if w is not None else 1.0
    if llama:
        xhat = np.asarray(jnp.asarray(xhat, jnp.float32).astype(h.dtype).astype(jnp.float32))
    return xhat * w64, h, rstd


def ulps(y, ref64):
    """Most |y - ref| in units of the last place of y's dtype at ref."""
    ref = jnp.asarray(ref64, jnp.float32).astype(y.dtype)
    step = (jnp.nextafter(jnp.abs(ref), jnp.asarray(jnp.inf, y.dtype)) - jnp.abs(ref)).astype(
        jnp.float32
    )
    err = jnp.abs(y.astype(jnp.float32) - jnp.asarray(ref64, jnp.float32))
    return float(jnp.max(err / step))


def values(m, n, dtype, fused, llama, offset, weight):
    k = jax.random.split(jax.random.key(m * 7 + n), 3)
    x = jax.random.normal(k[0], (m, n), jnp.float32).astype(dtype)
    r = jax.random.normal(k[1], (m, n), jnp.float32).astype(dtype) if fused else None
    w = (jax.random.normal(k[2], (n,), jnp.float32) * 0.5).astype(dtype) if weight else None
    ym, hm, rm = jax.jit(lambda *a: call(KM, *a, llama, offset))(x, r, w)
    yt, ht, rt = jax.jit(lambda *a: call(KT, *a, llama, offset))(x, r, w)
    y64, h, rstd64 = reference(x, r, w, llama, offset)
    out = dict(
        ulps_mgpu=ulps(ym, y64),
        ulps_triton=ulps(yt, y64),
        equal=float(jnp.mean(ym == yt)),
        rstd_rel=float(np.max(np.abs(np.asarray(rm, np.float64) / rstd64 - 1))),
    )
    if fused:
        out["h_equal"] = bool(jnp.all(hm == h))
    return out


def main():
    measure, why = load_profiler()
    cases = [
        (m, n, d, f, ll, off, wt)
        for (m, n, d, f, ll, off, wt) in [
            (1030, 4096, jnp.bfloat16, False, False, 0.0, True),
            (1030, 4096, jnp.bfloat16, True, False, 0.0, True),
            (1027, 8192, jnp.bfloat16, True, True, 1.0, True),
            (33, 5120, jnp.float16, False, True, 0.0, True),
            (257, 3584, jnp.float32, True, False, 0.0, False),
            (4, 256, jnp.bfloat16, False, False, 1.0, True),
            (4096, 7168, jnp.bfloat16, True, False, 0.0, True),
        ]
    ]
    print("values (max ulps of y vs float64; equal = share of y bit-equal to Triton)")
    for c in cases:
        try:
            print(" ", c[:2], jnp.dtype(c[2]).name, "fused llama offset weight", c[3:], values(*c))
        except Exception as e:  # noqa: BLE001  (report and go on: one call, many cases)
            print(" ", c[:2], "FAILED", type(e).__name__, str(e)[:400])
            traceback.print_exc(limit=-6)
    if measure is None:
        print("no CUPTI:", why)
        return
    print("times (us, warm / cold; bf16, weight bf16) and share of the copy")
    for shape in GPU_SHAPES + WIDTH_SHAPES:
        s = parse_shape(shape)
        m, n = s.rows, s.hidden
        x, r = (jax.random.normal(jax.random.key(i), (m, n)).astype(jnp.bfloat16) for i in (0, 1))
        w = jnp.ones((n,), jnp.bfloat16)
        for fused in (False, True):
            copy = copy_us(measure, (4 if fused else 2) * m * n * 2)
            op = "fused" if fused else "fwd"
            row = [f"{shape:>11} {op:5} copy {copy[0]:6.2f}/{copy[1]:6.2f}"]
            for name, kern in (("triton", KT), ("mgpu", KM)):
                if kern is KM and not KM.supported(m, n, jnp.bfloat16):
                    row.append(f"{name} unsupported")
                    continue
                try:
                    f = jax.jit(lambda x, r, w, kern=kern: call(kern, x, r, w))
                    t = time_us(measure, f, (x, r if fused else None, w))
                    share = copy[0] / t[0], copy[1] / t[1]
                    row.append(f"{name} {t[0]:6.2f}/{t[1]:6.2f} ({share[0]:.0%}/{share[1]:.0%})")
                except Exception as e:  # noqa: BLE001
                    row.append(f"{name} FAILED {type(e).__name__} {str(e)[:200]}")
            print("  " + "  ".join(row), flush=True)


def bwd_call(kernels, dy, x, rstd, w, dh=None, dres_dtype=None, offset=0.0):
    args = dict(weight_offset=offset, dx_dtype=x.dtype, dres_dtype=dres_dtype)
    if kernels is KT:
        args["interpret"] = False
    return kernels.rmsnorm_bwd(dy, x, rstd, w, dh, **args)


def bwd_values(m, n, dtype, weight, has_dh, dres_dtype, offset):
    k = jax.random.split(jax.random.key(m * 5 + n), 4)
    x = jax.random.normal(k[0], (m, n), jnp.float32).astype(dtype)
    dy = jax.random.normal(k[1], (m, n), jnp.float32).astype(dtype)
    dh = jax.random.normal(k[2], (m, n), jnp.float32).astype(dtype) if has_dh else None
    w = (1 + 0.2 * jax.random.normal(k[3], (n,), jnp.float32)).astype(dtype) if weight else None
    x64, dy64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, dy))
    rstd64 = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1) + EPS)
    rstd = jnp.asarray(rstd64, jnp.float32)
    w64 = np.asarray(w.astype(jnp.float32), np.float64) + offset if weight else 1.0
    xhat, g = x64 * rstd64[:, None], dy64 * w64
    dx64 = rstd64[:, None] * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    if has_dh:
        dx64 = dx64 + np.asarray(dh.astype(jnp.float32), np.float64)
    dw64 = np.sum(dy64 * xhat, axis=0)
    out = {}
    for name, kern in (("triton", KT), ("mgpu", KM)):
        f = jax.jit(lambda *a, kern=kern: bwd_call(kern, *a, dres_dtype=dres_dtype, offset=offset))
        dx, dres, dw = f(dy, x, rstd, w, dh)
        err = np.abs(np.asarray(dx.astype(jnp.float32), np.float64) - dx64)
        out[f"dx_{name}"] = float(np.max(err) / np.max(np.abs(dx64)))
        if dres is not None:
            out[f"dres_equal_{name}"] = bool(jnp.all(dres.astype(dx.dtype) == dx))
        if weight:
            dwf = np.asarray(dw.astype(jnp.float32), np.float64)
            out[f"dw_{name}"] = float(np.max(np.abs(dwf - dw64)) / np.max(np.abs(dw64)))
            out[f"dw_same_bits_{name}"] = bool(jnp.all(f(dy, x, rstd, w, dh)[2] == dw))
    return out


def backward():
    measure, why = load_profiler()
    print("backward values (max |err| / max |ref|; dweight's bits on a second run)")
    for c in [
        (1030, 4096, jnp.bfloat16, True, False, None, 0.0),
        (1027, 5120, jnp.bfloat16, True, True, jnp.float32, 1.0),
        (33, 5120, jnp.float16, True, False, None, 0.0),
        (4099, 1024, jnp.bfloat16, True, False, None, 0.0),
        (3, 2048, jnp.bfloat16, True, False, None, 0.0),
        (257, 3072, jnp.float32, False, True, None, 0.0),
        (4096, 7168, jnp.bfloat16, True, False, None, 0.0),
    ]:
        try:
            print(" ", c[:2], jnp.dtype(c[2]).name, "weight dh dres offset", c[3:], bwd_values(*c))
        except Exception as e:  # noqa: BLE001  (report and go on: one call, many cases)
            print(" ", c[:2], "FAILED", type(e).__name__, str(e)[:400])
            traceback.print_exc(limit=-6)
    if measure is None:
        print("no CUPTI:", why)
        return
    print("times (us, warm / cold; bf16, weight bf16; copy of 3 M N elements) and its share")
    for shape in GPU_SHAPES + ("4096x3072", "4096x1024", "16384x1024", "8192x2048"):
        s = parse_shape(shape)
        m, n = s.rows, s.hidden
        key = jax.random.split(jax.random.key(3), 2)
        dy, x = (jax.random.normal(k, (m, n)).astype(jnp.bfloat16) for k in key)
        rstd = jnp.ones((m,), jnp.float32)
        w = jnp.ones((n,), jnp.bfloat16)
        copy = copy_us(measure, 3 * m * n * 2)
        row = [f"{shape:>11} copy {copy[0]:6.2f}/{copy[1]:6.2f}"]
        t = time_us(measure, jax.jit(bwd), (dy, x, rstd, w))
        row.append(f"triton {t[0]:6.2f}/{t[1]:6.2f} ({copy[0] / t[0]:.0%}/{copy[1] / t[1]:.0%})")
        if not KM.supported_bwd(m, n, jnp.bfloat16):
            print("  " + "  ".join(row + ["mgpu unsupported"]), flush=True)
            continue
        best = None
        configs = [(KM.BWD_MAX_PROGRAMS, KM.BWD_PREFETCH)]  # the defaults
        for g, e in configs:
            restore = patched(KM, BWD_MAX_PROGRAMS=g, BWD_PREFETCH=e)
            try:
                f = jax.jit(lambda *a: bwd_call(KM, *a))
                t = time_us(measure, f, (dy, x, rstd, w))
                row.append(f"G{g}/P{e} {t[0]:.1f}/{t[1]:.1f}")
                best = min(best or (t[1], g, e), (t[1], g, e))
            except Exception as e:  # noqa: BLE001
                row.append(f"G{g}/P{e} FAILED {type(e).__name__} {str(e)[:200]}")
            finally:
                restore()
        if best:
            row.append(f"best cold G{best[1]}/P{best[2]} ({copy[1] / best[0]:.0%})")
        print("  " + "  ".join(row), flush=True)


if __name__ == "__main__":
    backward() if "--bwd" in sys.argv[1:] else main()
