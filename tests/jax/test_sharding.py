"""accel_jax on many devices (tests/jax/sharding_checks.py, each group in a fresh process).

On a CPU: 8 host devices (``--xla_force_host_platform_device_count=8``, set before JAX
starts), the reference path and the interpreted kernels (the Triton-lowered ones, and the
Mosaic GPU ones at a width they serve, on Explicit axes and in shard_map). On a machine
with several GPUs: the GPUs and the compiled kernels, unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from accel_jax import backends, kernels_mgpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ON_GPUS = jax.default_backend() == "gpu" and jax.device_count() > 1
# marked gpu on GPUs: GPU runs select their tests by that mark
PATHS = [pytest.param(p, marks=pytest.mark.gpu) for p in ("kernels", "kernels-mosaic_gpu")]
if not ON_GPUS:
    PATHS = ["reference", "interpret", "interpret-mosaic_gpu"]
GROUPS = ("modes", "transforms", "flax")


def run_checks(path: str, group: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if not ON_GPUS:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-m", "tests.jax.sharding_checks", path, group],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("OK"), out.stdout[-1000:]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("path", PATHS)
def test_many_devices(path, group):
    """Rows or hidden axis sharded over 1-D and 2-D meshes (Auto and Explicit axes) and
    inside shard_map: values within one device's bounds, the compiled collectives (none
    for rows in the forward, one dweight all-reduce in the backward, M-float all-reduces
    for a split hidden axis, no all-gather of activations), outputs sharded like x; vmap,
    scan, checkpoint and grad; Flax linen and nnx models, and Flax's axis_name."""
    if path == "interpret" and group == "flax":
        pytest.skip("the Flax checks exercise the sharding layer, not the kernels: reference only")
    if path.endswith("-mosaic_gpu") and group != "modes":
        # (and interpreted, its ordered effects are beyond jax.checkpoint's partial eval)
        pytest.skip("the Mosaic GPU kernels under the modes group's placements only")
    if path == "interpret-mosaic_gpu" and kernels_mgpu.INTERPRET_UNAVAILABLE:
        pytest.skip(f"no Mosaic GPU interpret mode: {kernels_mgpu.INTERPRET_UNAVAILABLE}")
    if path == "kernels-mosaic_gpu" and not backends.hopper_or_newer():
        pytest.skip("the Mosaic GPU kernels need compute capability 9.0 or newer")
    run_checks(path, group)


def test_flax_axis_name_under_vmap_is_flaxs():
    """axis_name over a vmapped axis (each entry one block of the hidden axis): the
    statistics span the whole row, as flax's pmean of the mean square (forward; the
    gradients with axis_name are checked inside shard_map, in the subprocess)."""
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from accel_jax import linen as alinen
    from accel_jax import nnx as annx
    from tests.jax.helpers import assert_output_close, fwd64, rand

    x = rand(1, (4, 3, 8), jnp.float32)  # 4 blocks of 8 features of (3, 32) rows
    scale = rand(2, (4, 8), jnp.float32, 0.2, 1.0)
    whole = jnp.moveaxis(x, 0, 1).reshape(3, 32)

    def linen(cls):
        def f(x, s):
            return cls(axis_name="b").apply({"params": {"scale": s}}, x)

        return jax.vmap(f, axis_name="b")(x, scale)

    ref = fwd64(whole, None, jnp.reshape(scale, (32,)))[0].reshape(3, 4, 8).transpose(1, 0, 2)
    assert_output_close(linen(alinen.RMSNorm), ref, what="y")
    np.testing.assert_allclose(linen(alinen.RMSNorm), linen(nn.RMSNorm), rtol=1e-5, atol=1e-6)

    def nnx_y(cls):
        return jax.vmap(lambda x: cls(8, axis_name="b", rngs=nnx.Rngs(0))(x), axis_name="b")(x)

    assert_output_close(nnx_y(annx.RMSNorm), fwd64(whole)[0].reshape(3, 4, 8).transpose(1, 0, 2))
    np.testing.assert_allclose(nnx_y(annx.RMSNorm), nnx_y(nnx.RMSNorm), rtol=1e-5, atol=1e-6)
