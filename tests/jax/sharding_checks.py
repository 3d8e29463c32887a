"""accel_jax on many devices: values, compiled collectives and shardings, in a fresh process.

Run by tests/jax/test_sharding.py (XLA_FLAGS must be set before JAX starts):
``python -m tests.jax.sharding_checks PATH GROUP`` with PATH "reference" | "interpret" |
"kernels" (compiled, on GPUs), or "interpret-mosaic_gpu" | "kernels-mosaic_gpu" (the Mosaic
GPU kernels, at 1024 columns), and GROUP "modes" | "transforms" | "flax". Uses every device
(8 forced host CPU devices in CI, or the GPUs): 1-D (D) and 2-D (2 x D/2) meshes, Auto and
Explicit axis types, and a user's shard_map. Prints OK last.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import accel_jax
from accel_jax import kernels_mgpu
from tests.jax.helpers import assert_grad_close, assert_output_close, bwd64, f64, fwd64, rand

PATH, GROUP = sys.argv[1], sys.argv[2]
# "...-mosaic_gpu": the Mosaic GPU kernels (compiled or interpreted), at a width they serve
MOSAIC_GPU = PATH.endswith("-mosaic_gpu")
if MOSAIC_GPU:
    os.environ["ACCEL_JAX_BACKEND"] = "mosaic_gpu"
accel_jax.set_interpret(PATH.startswith("interpret"))
D = jax.device_count()
assert D >= 2 and D % 2 == 0, jax.devices()
# rows 32 split up to 8 ways, hidden 16 (1024) split up to 8 ways
SHAPE = (8, 4, 1024) if MOSAIC_GPU else (8, 4, 16)
# Mosaic GPU's interpret mode calls back to the host with ordered effects, which
# custom_partitioning (the Auto axes' path) cannot lower: there, Explicit axes and shard_map.
INTERPRETED_MOSAIC_GPU = MOSAIC_GPU and PATH.startswith("interpret")
AXIS_TYPES = (AxisType.Explicit,) if INTERPRETED_MOSAIC_GPU else (AxisType.Auto, AxisType.Explicit)
TRACED = collections.Counter()  # Mosaic GPU kernels traced, by name


def _counted(name, kernel):
    def traced(*args, **kwargs):
        TRACED[name] += 1
        return kernel(*args, **kwargs)

    return traced


for _name in ("rmsnorm_fwd", "rmsnorm_bwd"):
    setattr(kernels_mgpu, _name, _counted(_name, getattr(kernels_mgpu, _name)))
EPS32 = float(np.finfo(np.float32).eps)


def meshes(axis_type):
    out = [jax.make_mesh((D,), ("data",), axis_types=(axis_type,))]
    if D >= 4:
        out.append(jax.make_mesh((2, D // 2), ("data", "model"), axis_types=(axis_type,) * 2))
    return out


def cases(mesh):
    """(spec of x, axes splitting rows, axes splitting the hidden axis)."""
    if len(mesh.axis_names) == 1:
        return [(P("data"), ("data",), ()), (P(None, None, "data"), (), ("data",))]
    return [
        (P("data", "model"), ("data", "model"), ()),
        (P("data", None, "model"), ("data",), ("model",)),
    ]


def collectives(text: str):
    """(kind, element count) of every collective in compiled HLO text."""
    found = []
    pattern = r"= \(?([a-z]+[0-9]*)\[([0-9,]*)\][^=]*? (all-reduce|all-gather|all-to-all|" \
        r"collective-permute|reduce-scatter)(?:-start)?\("  # fmt: skip
    for m in re.finditer(pattern, text):
        dims = [int(d) for d in m.group(2).split(",") if d]
        found.append((m.group(3), int(np.prod(dims)) if dims else 1))
    return found


def sharded(a, mesh, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))


def same_sharding(out, ref, ndim):
    assert out.sharding.is_equivalent_to(ref.sharding, ndim), (out.sharding, ref.sharding)


def check_values(out, x, r, w, dy, *, weight_offset=0.0, casting="fp32", residual_dtype=None):
    """out = (y, h, dx, dr, dw) of the fused op against float64 (one device's bounds)."""
    y, h, dx, dr, dw = out
    y64, h64, _ = fwd64(x, r, w, weight_offset=weight_offset, casting=casting,
                        round_dtype=residual_dtype)  # fmt: skip
    assert_output_close(y, y64, what="y")
    np.testing.assert_array_equal(f64(h), h64)
    gx, gw, cx, cw = bwd64(dy, h64, w, weight_offset=weight_offset, dh=h)
    assert_grad_close(dx, gx, cx, what="dx")
    assert_grad_close(dr, gx, cx, what="dresidual")
    assert_grad_close(dw, gw, cw, per_row=False, what="dweight")


def fused_vjp(**kw):
    def f(x, r, w, dy):
        (y, h), vjp = jax.vjp(
            lambda x, r, w: accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True, **kw),
            x, r, w,
        )  # fmt: skip
        return (y, h, *vjp((dy, h)))

    return jax.jit(f)


def assert_dweight_like_single(dw, dw1, dy, h):
    """dweight differs from one device's only by the order of its fp32 row sums."""
    terms = np.abs(f64(dy) * f64(h)).reshape(-1, SHAPE[-1]).sum(0)
    m = int(np.prod(SHAPE[:-1]))
    bound = 2 * (m - 1) * EPS32 * terms * 2  # rstd <= ~2 here; |xhat| <= |h| * rstd
    assert np.all(np.abs(f64(dw) - f64(dw1)) <= bound), "dweight beyond summation order"


def check_modes():
    x, r, dy = (rand(k, SHAPE, jnp.float32) for k in (1, 2, 3))
    w = rand(4, SHAPE[-1:], jnp.float32, 0.2, 1.0)
    xb = x.astype(jnp.bfloat16)
    configs = [
        (x, dict()),
        (x, dict(casting="llama", weight_offset=1.0)),
        (xb, dict(residual_dtype=jnp.float32, weight_offset=1.0)),
    ]
    single = [fused_vjp(**kw)(xi, r, w, dy.astype(xi.dtype)) for xi, kw in configs]
    fwd = jax.jit(lambda x, w: accel_jax.rmsnorm(x, w))
    for axis_type in AXIS_TYPES:
        for mesh in meshes(axis_type):
            for spec, rows, hidden in cases(mesh):
                s = functools.partial(sharded, mesh=mesh, spec=spec)
                ws = sharded(w, mesh, P())
                local_rows = int(np.prod(SHAPE[:-1])) // np.prod([mesh.shape[a] for a in rows])
                n_local = SHAPE[-1] // int(np.prod([mesh.shape[a] for a in hidden]))
                for (xi, kw), one in zip(configs, single, strict=True):
                    f = fused_vjp(**kw)
                    args = (s(xi), s(r), ws, s(dy.astype(xi.dtype)))
                    out = f(*args)
                    what = (axis_type, mesh.axis_names, spec, kw)
                    try:
                        check_values(out, xi, r, w, dy.astype(xi.dtype), **kw)
                        assert_dweight_like_single(out[4], one[4], dy, out[1])
                    except AssertionError as e:
                        raise AssertionError(f"{what}: {e}") from e
                    for o in out[:4]:
                        same_sharding(o, args[0], 3)
                    if kw:
                        continue
                    # the compiled program: the collectives this placement needs, no others
                    found = collectives(f.lower(*args).compile().as_text())
                    y_found = collectives(fwd.lower(args[0], ws).compile().as_text())
                    if not hidden:
                        assert y_found == [], (what, y_found)
                        assert found == [("all-reduce", SHAPE[-1])], (what, found)
                    else:
                        assert y_found and all(c == ("all-reduce", local_rows) for c in y_found)
                        # weight is replicated: its gradient may be gathered (N floats)
                        expected = {("all-reduce", local_rows), ("all-gather", SHAPE[-1])}
                        if rows:  # dweight summed over the row axes
                            expected.add(("all-reduce", n_local))
                        assert set(found) <= expected, (what, found)
                        assert ("all-gather", int(np.prod(SHAPE))) not in found
                    assert jax.typeof(fwd(args[0], ws)).shape == SHAPE
                    same_sharding(fwd(args[0], ws), args[0], 3)
    check_shard_map(x, r, w, dy)


def check_shard_map(x, r, w, dy):
    """Inside a user's shard_map: rows split over every axis, w replicated (its gradient
    summed by JAX's transpose of the cast to varying)."""
    mesh = jax.make_mesh((2, D // 2), ("data", "model"))
    spec = P("data", "model")

    def body(x, r, w, dy):
        *outs, dw = fused_vjp()(x, r, w, dy)
        if not check:  # no vma types: the user sums the replicated weight's gradient
            dw = jax.lax.psum(dw, ("data", "model"))
        return (*outs, dw)

    # Pallas interpret mode cannot be lowered under check_vma=True (its padding mixes
    # varying and invariant values); there, the trace (the kernels' vma) is checked.
    check = PATH != "interpret"
    outs = (spec, spec, spec, spec, P())
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, P(), spec),
                              out_specs=outs, check_vma=check))  # fmt: skip
    args = [sharded(a, mesh, s) for a, s in zip((x, r, w, dy), (spec, spec, P(), spec),
                                                strict=True)]  # fmt: skip
    check_values(f(*args), x, r, w, dy)
    if not check:
        g = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, P(), spec), out_specs=outs)
        jaxpr = str(jax.make_jaxpr(g)(*args))
        # the kernels' outputs are typed varying over both axes (local rows: 4 x 1)
        assert f"ShapedArray(float32[4,{SHAPE[-1]}]{{V:(data,model)}})" in jaxpr, jaxpr[-2000:]


def check_transforms():
    """vmap, scan, checkpoint and grad on sharded inputs, against one device."""
    x, r = rand(1, SHAPE, jnp.float32), rand(2, SHAPE, jnp.float32)
    ws = rand(3, (2, SHAPE[-1]), jnp.float32, 0.2, 1.0)

    def model(x, r, ws):
        def layer(carry, w):
            x, r = carry
            norm = jax.checkpoint(
                lambda x, r, w: accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)
            )
            y, h = norm(x, r, w)
            return (jnp.tanh(y), h), None

        (y, h), _ = jax.lax.scan(layer, (x, r), ws)
        return jnp.sum(y * y) + jnp.sum(jnp.sin(h))

    batched = lambda x, r, ws: jnp.sum(jax.vmap(model, (0, 0, None))(x, r, ws))  # noqa: E731
    per_example = jax.vmap(jax.grad(model, argnums=2), (0, 0, None))
    grad = jax.jit(jax.grad(batched, argnums=(0, 1, 2)))
    pe = jax.jit(per_example)
    g1, pe1 = grad(x, r, ws), pe(x, r, ws)
    for axis_type in AXIS_TYPES:
        mesh = meshes(axis_type)[-1]
        for spec in (P(mesh.axis_names[0]), P(None, None, mesh.axis_names[-1])):
            args = (sharded(x, mesh, spec), sharded(r, mesh, spec), sharded(ws, mesh, P()))
            for got, ref in ((grad(*args), g1), ((pe(*args),), (pe1,))):
                for a, b in zip(got, ref, strict=True):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
            found = collectives(grad.lower(*args).compile().as_text())
            assert ("all-gather", int(np.prod(SHAPE))) not in found, (spec, found)


def check_flax():
    import flax.linen as nn
    from flax import nnx

    from accel_jax import linen as alinen
    from accel_jax import nnx as annx

    x = rand(1, (8, 6, 16), jnp.float32)
    y = rand(2, (8, 6, 16), jnp.float32)
    mesh = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Auto,))
    xs, ys = (sharded(a, mesh, P("data")) for a in (x, y))

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(alinen.RMSNorm()(nn.Dense(16)(x)))

    model = Linen()
    params = model.init(jax.random.key(0), x)
    loss = lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)  # noqa: E731
    step = jax.jit(jax.value_and_grad(loss))
    (l1, g1), (l8, g8) = step(params, x, y), step(params, xs, ys)
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g8, g1)

    class Nnx(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)
            self.norm = annx.RMSNorm(16, rngs=rngs)

        def __call__(self, x):
            return self.b(self.norm(self.a(x)))

    m = Nnx(nnx.Rngs(0))

    @nnx.jit
    def nstep(m, x, y):
        return nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)

    (l1, g1), (l8, g8) = nstep(m, x, y), nstep(m, xs, ys)
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nnx.state(g8), nnx.state(g1))  # fmt: skip

    # axis_name: the hidden axis split over "model" inside shard_map, as flax computes it
    mesh2 = jax.make_mesh((D,), ("model",))
    feat = P(None, None, "model")
    scale = rand(3, (16,), jnp.float32, 0.2, 1.0)
    args = (sharded(x, mesh2, feat), sharded(scale, mesh2, P("model")))
    specs = (feat, P("model"))

    def linen_grad(cls):
        def body(x, s):
            p = {"params": {"scale": s}}
            loss = lambda x, p: jnp.sum(jnp.sin(cls(axis_name="model").apply(p, x)))  # noqa: E731
            return cls(axis_name="model").apply(p, x), jax.grad(loss, argnums=(0, 1))(x, p)

        out = (feat, (feat, {"params": {"scale": P("model")}}))
        return jax.jit(jax.shard_map(body, mesh=mesh2, in_specs=specs, out_specs=out))(*args)

    (y1, (gx, gp)), (y0, (gx0, gp0)) = linen_grad(alinen.RMSNorm), linen_grad(nn.RMSNorm)
    assert_output_close(y1, fwd64(x, None, scale)[0], what="y axis_name")
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gx0, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), gp, gp0)

    def nnx_grad(cls):
        def body(x):
            norm = cls(x.shape[-1], axis_name="model", rngs=nnx.Rngs(0))
            return jax.grad(lambda x: jnp.sum(jnp.sin(norm(x))))(x), norm(x)

        return jax.jit(jax.shard_map(body, mesh=mesh2, in_specs=feat, out_specs=(feat, feat)))(
            args[0]
        )

    (gx, y2), (gx0, y0) = nnx_grad(annx.RMSNorm), nnx_grad(nnx.RMSNorm)
    assert_output_close(y2, fwd64(x, None, None)[0], what="nnx axis_name")
    np.testing.assert_allclose(y2, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gx0, rtol=1e-5, atol=1e-6)


{"modes": check_modes, "transforms": check_transforms, "flax": check_flax}[GROUP]()
if MOSAIC_GPU:  # the forward and the backward ran the Mosaic GPU kernels
    print("Mosaic GPU kernels traced:", dict(TRACED))
    assert TRACED["rmsnorm_fwd"] and TRACED["rmsnorm_bwd"], TRACED
print("OK")
