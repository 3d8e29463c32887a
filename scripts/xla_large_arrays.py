"""Does XLA compile and run plain-jnp RMSNorm at 2^31 + 32768 bf16 elements (arrays past
2^32 bytes)? One case per subprocess (a crash ends only that one); prints each outcome.

    python scripts/xla_large_arrays.py
"""

import subprocess
import sys

CASE = """
import jax, jax.numpy as jnp
m, n = (2**31 + 32768) // 4096, 4096
x = jnp.ones((m, n), jnp.bfloat16)
w = jnp.ones((n,), jnp.float32)
def norm(x, w):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6) * w).astype(x.dtype)
if "{what}" == "forward":
    out = jax.jit(norm)(x, w)
else:
    y, vjp = jax.vjp(norm, x, w)
    out = jax.jit(vjp)(y)[0]
print("{what}: ran, sum", float(jnp.sum(out[:4].astype(jnp.float32))))
"""

for what in ("forward", "backward"):
    r = subprocess.run(
        [sys.executable, "-c", CASE.format(what=what)], capture_output=True, text=True
    )
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    print(f"{what}: exit code {r.returncode}: {tail[0][:200]}", flush=True)
