"""A mesh of the devices this process has (one CPU in CI, the GPUs on a GPU machine): Explicit
and Auto mesh axes, and a user's shard_map with its default check_vma=True, against float64.
A mesh of one device still types arrays with its axes (Explicit: sharded refs; Manual:
varying values), so it takes the sharding layer, not the single-device shortcut."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import accel_jax
from tests.jax.helpers import assert_grad_close, assert_output_close, bwd64, f64, fwd64, rand

SHAPE = (256, 1024)


ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(params=["kernels"] if ON_GPU else ["reference", "interpret"], autouse=True)
def path(request):
    """Compiled kernels on a GPU; elsewhere the reference math and the interpreted kernels."""
    previous = accel_jax.get_interpret()
    accel_jax.set_interpret(request.param == "interpret")
    yield request.param
    accel_jax.set_interpret(previous)


def _inputs():
    x = rand(0, SHAPE, jnp.bfloat16, 2.0)
    w = rand(1, SHAPE[-1:], jnp.bfloat16, 0.3, 1.0)
    dy = rand(2, SHAPE, jnp.bfloat16)
    return x, w, dy


def _value_and_grads(f, x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


def _check(y, dx, dw, x, w, dy):
    y64, _h64, _ = fwd64(x, None, w)
    assert_output_close(y, y64, what="y")
    gx, gw, cx, cw = bwd64(dy, f64(x), w)
    assert_grad_close(dx, gx, cx, what="dx")
    assert_grad_close(dw, gw, cw, per_row=False, what="dweight")


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_rows_sharded_over_the_devices(axis_type):
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
    x, w, dy = _inputs()
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    dys = jax.device_put(dy, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    y, dx, dw = jax.jit(lambda *a: _value_and_grads(accel_jax.rmsnorm, *a))(xs, ws, dys)
    assert y.sharding.is_equivalent_to(xs.sharding, 2)
    _check(y, dx, dw, x, w, dy)


def test_inside_shard_map_with_check_vma(path):
    if path == "interpret":
        pytest.skip(
            "Pallas interpret mode cannot be lowered under check_vma (JAX pads blocks "
            "with an invariant value); the compiled kernels and the reference can"
        )
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Explicit,))
    x, w, dy = _inputs()

    def local(x, w, dy):  # w is invariant: its cotangent comes back summed over "data"
        return _value_and_grads(accel_jax.rmsnorm, x, w, dy)

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data"), P(), P("data")),
        out_specs=(P("data"), P("data"), P()),
    )
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    y, dx, dw = jax.jit(f)(put(x, P("data")), put(w, P()), put(dy, P("data")))
    _check(y, dx, dw, x, w, dy)
