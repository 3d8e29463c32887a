"""accel_jax at 2^31 + 32768 bf16 elements (4096 columns; x, y and dx past 2^32 bytes, one kernel
launch each): forward, backward and grad in several forms, each in its own
subprocess (a crash ends only that one), in waves of a few (GPU memory). x is all ones and
dy all halves, so dweight[0] must be 0.5 * M = 262148 and dx about 0.

    python scripts/large_arrays_check.py OUT_DIR
"""

import os
import subprocess
import sys

CASE = r"""
import sys, faulthandler; faulthandler.enable()
import jax, jax.numpy as jnp
import accel_jax
what = sys.argv[1]
m, n = (2**31 + 32768) // 4096, 4096
x = jax.jit(lambda: jnp.ones((m, n), jnp.bfloat16))()
dy = jax.jit(lambda: jnp.full((m, n), 0.5, jnp.bfloat16))()
w = None if what == "noweight" else jnp.ones((n,), jnp.float32)
if what == "grad":
    def loss(x, w):
        return jnp.sum(accel_jax.rmsnorm(x, w).astype(jnp.float32))
    g = jax.jit(jax.grad(loss, argnums=0))(x, w)
    print("grad ok", float(g[0, 0]))
elif what == "fwdjit":
    y = jax.jit(lambda x, w: accel_jax.rmsnorm(x, w))(x, w)
    print("fwdjit ok", float(y[-1, -1]))
elif what == "lowered":
    y, vjp = jax.vjp(lambda x: accel_jax.rmsnorm(x, w), x)
    print(jax.jit(vjp).lower(dy).as_text()[:6000])
elif what.startswith("vjpw"):
    y, vjp = jax.vjp(lambda x, w: accel_jax.rmsnorm(x, w), x, w)
    print("fwd ok", flush=True)
    if what == "vjpw_dw":
        dw = jax.jit(lambda dy: vjp(dy)[1])(dy)
        print(what, "ok", float(dw[0]))
    else:
        dx, dw = jax.jit(vjp)(dy)
        print(what, "ok", float(dx[-1, -1]), float(dw[0]))
else:
    y, vjp = jax.vjp(lambda x: accel_jax.rmsnorm(x, w), x)
    print("fwd ok", flush=True)
    dx = jax.jit(vjp)(dy)[0]
    print(what, "ok", float(dx[-1, -1]))
"""


def run(what, flags=""):
    env = dict(os.environ)
    if flags.startswith("B="):
        env["ACCEL_JAX_BACKEND"] = flags[2:]
        flags = ""
    if flags:
        env["XLA_FLAGS"] = flags
    return subprocess.Popen(
        [sys.executable, "-c", CASE, what],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


waves = [
    [("vjp", ""), ("grad", ""), ("noweight", "")],
    [
        ("vjp", "--xla_gpu_enable_dynamic_slice_fusion=false"),
        ("vjp", "--xla_gpu_enable_command_buffer="),
        ("fwdjit", ""),
    ],
    [("vjpw", "B=auto"), ("vjpw", "B=triton"), ("vjpw_dw", "B=mosaic_gpu")],
    [("vjpw", "--xla_gpu_enable_dynamic_slice_fusion=false")],
]
os.makedirs(sys.argv[1], exist_ok=True)
for i, wave in enumerate(waves):
    ps = [(w, f, run(w, f)) for w, f in wave]
    for j, (w, f, p) in enumerate(ps):
        out, _ = p.communicate()
        open(f"{sys.argv[1]}/{i}{j}_{w}.log", "w").write(out)
        lines = [ln for ln in out.splitlines() if "ok" in ln or "Fatal" in ln or "Error" in ln]
        print(f"{w} [{f}] rc={p.returncode}: {lines[-3:]}", flush=True)
# jit(vjp)'s program: the saved x captured as a constant (a splat here: all ones)
p = run("lowered")
out, _ = p.communicate()
open(f"{sys.argv[1]}/lowered.txt", "w").write(out)
