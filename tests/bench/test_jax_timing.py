"""The CUPTI bookkeeping of bench.jax_timing, driven by fake profilers on the CPU.

A fake ``measure`` has the real one's signature; it really runs the jitted function (so
the flush/barrier wrapper is checked to compute the op) and returns made-up kernel records.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import jax_timing

FLUSH = ("loop_xor_fusion", 0.200)  # (name, ms)
OP = [("rmsnorm_fwd", 0.010), ("loop_convert_fusion", 0.002)]


class FakeMeasure:
    """Stands in for mosaic.gpu.profiler.measure(f, *, aggregate, iterations)."""

    def __init__(self, op_records, flush_records=(FLUSH,), jitter=None):
        self.op_records, self.flush_records = list(op_records), list(flush_records)
        self.jitter = jitter or (lambda i: 0.0)
        self.outputs = []

    def __call__(self, f, *, aggregate=True, iterations=1):
        assert aggregate is False

        def wrapper(*args):
            out = jax.block_until_ready(f(*args))
            self.outputs.append(out)
            flush_only = len(args) == 2 and args[0].size >= 1 << 10 and args[1].ndim == 0
            cold = len(args) > 2 and args[0].size >= 1 << 10 and args[1].ndim == 0
            per_call = []
            for i in range(iterations):
                if flush_only:
                    recs = list(self.flush_records)
                else:
                    recs = [(n, ms + self.jitter(i)) for n, ms in self.op_records]
                    if cold:
                        recs = list(self.flush_records) + recs
                per_call.append(recs)
            return out, (per_call[0] if iterations == 1 else per_call)

        return wrapper


def test_call_us_and_drop_kernels():
    assert jax_timing.call_us([OP, [FLUSH]]) == pytest.approx([12.0, 200.0])
    # the earliest occurrence of a name goes, even when the op has a kernel of that name
    recs = [("k", 1.0), ("x", 2.0), ("k", 3.0)]
    assert jax_timing.drop_kernels(recs, ["k"]) == [("x", 2.0), ("k", 3.0)]
    with pytest.raises(ValueError, match="not found"):
        jax_timing.drop_kernels(recs, ["flush"])
    # XLA may number a fusion differently in the flushed module
    renamed = [("rmsnorm", 1.0), ("loop_xor_fusion.1", 9.0), ("loop_xor_fusion_2", 8.0)]
    assert jax_timing.drop_kernels(renamed, ["loop_xor_fusion"]) == [
        ("rmsnorm", 1.0),
        ("loop_xor_fusion_2", 8.0),
    ]
    assert jax_timing.drop_kernels([("a_1", 1.0)], ["a_1"]) == []


def test_warm_is_median_of_per_call_sums():
    fake = FakeMeasure(OP, jitter=lambda i: 0.001 * i)  # per kernel: +1 us per call index
    f = lambda x, w: x * w
    args = (jnp.ones((4, 8)), jnp.full((8,), 2.0))
    us, names = jax_timing.warm(fake, f, args, calls=5)
    # call i: 12 us + 2 kernels * i us -> 12, 14, 16, 18, 20 -> median 16
    assert us == pytest.approx(16.0)
    assert names == ["rmsnorm_fwd", "loop_convert_fusion"]
    np.testing.assert_array_equal(fake.outputs[-1], np.full((4, 8), 2.0))


def test_cold_excludes_flush_and_runs_the_op():
    fake = FakeMeasure(OP)
    f = lambda x, w: x * w
    x, w = jnp.arange(32.0).reshape(4, 8), jnp.full((8,), 3.0)
    us = jax_timing.cold(fake, f, (x, w), calls=3, kernels_per_call=2, flush_bytes=1 << 16)
    assert us == pytest.approx(12.0)  # the 200 us flush is not counted
    flushed, y = fake.outputs[-1]
    np.testing.assert_array_equal(y, np.asarray(x) * 3.0)  # the barrier passed inputs intact
    assert flushed.shape == ((1 << 16) // 4,)  # the flush ran over the whole buffer
    assert np.all(np.asarray(flushed) == (1 ^ 0x5A5A))


def test_cold_refuses_when_the_op_cannot_be_separated():
    # the cold run shows an extra kernel the warm run did not have: refuse, do not guess
    fake = FakeMeasure(OP + [("copy", 0.004)])
    f = lambda x: x + 1
    with pytest.raises(RuntimeError, match="cannot separate"):
        jax_timing.cold(fake, f, (jnp.ones(4),), calls=2, kernels_per_call=2, flush_bytes=4096)


def test_call_records_other_signatures():
    # a profiler without iterations= (one measured call per measure call), with mode=
    seen = {}

    def old_measure(f, *, mode="events", aggregate=True):
        seen["mode"] = mode

        def wrapper(*args):
            return f(*args), [("k", 0.5)]

        return wrapper

    per_call = jax_timing.call_records(old_measure, jax.jit(lambda a: a), (jnp.ones(2),), 3)
    assert per_call == [[("k", 0.5)]] * 3 and seen["mode"] == "cupti"

    def empty_measure(f, *, aggregate=True, iterations=1):
        return lambda *args: (f(*args), None)

    with pytest.raises(RuntimeError, match="no kernels"):
        jax_timing.call_records(empty_measure, jax.jit(lambda a: a), (jnp.ones(2),), 1)


def test_copy_fn_and_peak_bytes():
    f, args, moved = jax_timing.copy_fn(1000)
    assert moved == 8 * 125 and args[0].shape == (125,)
    np.testing.assert_array_equal(jax.jit(f)(*args), np.ones(125, np.int32))
    out_bytes = 16 * 64 * 4
    peak = jax_timing.peak_bytes(lambda x: x * 2.0, (jnp.ones((16, 64), jnp.float32),))
    assert peak is not None and peak >= out_bytes


def test_load_profiler_reports_a_reason_or_a_function():
    measure, reason = jax_timing.load_profiler()
    assert (measure is None) != (reason is None)
    assert measure is None or callable(measure)
