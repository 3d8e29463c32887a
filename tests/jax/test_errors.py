"""Bad input: a clear ValueError/TypeError naming the argument (and shapes/dtypes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accel_jax
from accel_jax import checks

X = jnp.ones((4, 8), jnp.float32)
W = jnp.ones((8,), jnp.float32)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: accel_jax.rmsnorm(X, jnp.ones((7,))), ValueError, ["weight", "(8,)", "(7,)"]),
        (lambda: accel_jax.rmsnorm(X, jnp.ones((1, 8))), ValueError, ["weight", "(1, 8)"]),
        (lambda: accel_jax.rmsnorm(jnp.ones((4, 8), jnp.int32)), TypeError, ["x", "int32"]),
        (lambda: accel_jax.rmsnorm(X, jnp.ones((8,), jnp.int8)), TypeError, ["weight", "int8"]),
        (lambda: accel_jax.rmsnorm(jnp.ones((4, 0))), ValueError, ["x", "N", "(4, 0)"]),
        (lambda: accel_jax.rmsnorm(jnp.ones(())), ValueError, ["x", "dimension"]),
        (lambda: accel_jax.rmsnorm(X, W, -1e-6), ValueError, ["eps", "-1e-06"]),
        (lambda: accel_jax.rmsnorm(X, W, float("nan")), ValueError, ["eps", "nan"]),
        (lambda: accel_jax.rmsnorm(X, W, float("inf")), ValueError, ["eps", "inf"]),
        (lambda: accel_jax.rmsnorm(X, W, "1e-6"), TypeError, ["eps"]),
        (lambda: accel_jax.rmsnorm(X, W, casting="bf16"), ValueError, ["casting", "bf16"]),
        (lambda: accel_jax.rmsnorm(X, weight_offset=1.0), ValueError, ["weight_offset"]),
        (
            lambda: accel_jax.rmsnorm(X, W, weight_offset=float("nan")),
            ValueError,
            ["weight_offset"],
        ),
        (
            lambda: accel_jax.rmsnorm_residual_fused(X, jnp.ones((4, 9))),
            ValueError,
            ["residual", "(4, 8)", "(4, 9)"],
        ),
        (
            lambda: accel_jax.rmsnorm_residual_fused(X, jnp.ones((4, 8), jnp.int32)),
            TypeError,
            ["residual", "int32"],
        ),
        (lambda: accel_jax.rmsnorm_residual_fused(X, None), TypeError, ["residual"]),
        (
            lambda: accel_jax.rmsnorm_residual_fused(X, X, residual_dtype=jnp.int32),
            TypeError,
            ["residual_dtype", "int32"],
        ),
        (
            lambda: accel_jax.rmsnorm_residual_fused(X, X, casting="fp16"),
            ValueError,
            ["casting"],
        ),
        (
            lambda: accel_jax.rmsnorm_residual_fused(X, X, return_residual="yes"),
            TypeError,
            ["return_residual"],
        ),
        (lambda: accel_jax.rmsnorm("x"), TypeError, ["x"]),
    ],
)
def test_bad_input_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_traced_eps_is_rejected():
    with pytest.raises(TypeError, match="eps"):
        jax.jit(lambda e: accel_jax.rmsnorm(X, W, e))(1e-6)


def test_float64_dtype_needs_x64():
    """Without jax_enable_x64 JAX turns float64 arrays into float32; a float64 dtype argument
    is refused (under x64 it is computed in float64: tests/jax/test_edges.py)."""
    with pytest.raises(TypeError, match="x=float64 needs jax_enable_x64"):
        checks.check_float_dtype("x", np.float64)
    with jax.enable_x64(True):
        assert checks.check_float_dtype("x", np.float64) == jnp.float64


def test_numpy_inputs_are_accepted():
    y = accel_jax.rmsnorm(np.ones((2, 8), np.float32), np.ones(8, np.float32))
    np.testing.assert_allclose(np.asarray(y), np.ones((2, 8)), rtol=1e-6)
