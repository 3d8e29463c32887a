"""Property-based fuzzing of both halves: shapes, dtypes, options and magnitudes.

Hypothesis draws a :class:`Case` (any leading shape, N, dtype, weight form, castings,
fused options, layout, eps, value scale) and the same checks as the case table must hold.
The example count is bounded for CI (``NUMERICS_FUZZ_EXAMPLES``, default 24: about half a
minute interpreted); shrinking is off, since every example is slow when interpreted and
the failing Case printed by hypothesis is already a complete reproducer.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .cases import Case
from .runner import run_case
from .test_parity import _explain

EXAMPLES = int(os.environ.get("NUMERICS_FUZZ_EXAMPLES", "24"))
# The Mosaic GPU fuzz: wider rows, about 8 s an example interpreted.
MOSAIC_GPU_EXAMPLES = int(os.environ.get("NUMERICS_FUZZ_MOSAIC_GPU_EXAMPLES", "10"))

# log10 of the value scale, per dtype: wide for the fp32-range formats; fp16 stays clear of
# its max (65504) and of the subnormal range, which the table covers on purpose.
SCALES = {"float32": (-15, 15), "bfloat16": (-15, 15), "float16": (-2, 3)}


# Widths that accel_jax's Mosaic GPU kernels serve: rows in registers (up to 8192; 128, 896
# and 2880 with loads narrower than 16 bytes), in several warpgroups (9216, 12288) and in
# column chunks (16896).
MOSAIC_GPU_WIDTHS = st.sampled_from(
    [128, 256, 512, 896, 1024, 2880, 3584, 5120, 6144, 7168, 9216, 12288, 16896]
)


@st.composite
def fuzz_cases(draw, widths=None) -> Case:
    """A case; widths: N's strategy, with no zero-row leading shapes (0 rows runs no kernel)."""
    dtype = draw(st.sampled_from(["bfloat16", "float16", "float32"]))
    lead = tuple(draw(st.lists(st.integers(0 if widths is None else 1, 5), max_size=2)))
    if not lead or draw(st.booleans()):
        lead = lead + (draw(st.integers(1, 12)),)
    if widths is None:
        widths = st.one_of(st.integers(1, 70), st.integers(71, 1100))
    n = draw(widths)
    weight = draw(st.sampled_from([None, "same", "same", "float32"]))
    offset = 0.0 if weight is None else draw(st.sampled_from([0.0, 0.0, 1.0]))
    fused = draw(st.booleans())
    lo, hi = SCALES[dtype]
    return Case(
        name="fuzz",
        shape=lead + (n,),
        dtype=dtype,
        weight=weight,
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.1, 0.0])),
        weight_offset=offset,
        casting=draw(st.sampled_from(["fp32", "llama"])),
        fused=fused,
        return_residual=fused and draw(st.booleans()),
        residual_dtype=draw(st.sampled_from([None, "float32"])) if fused else None,
        strided=draw(st.booleans()),
        scale=10.0 ** draw(st.integers(lo, hi)),
        seed=draw(st.integers(0, 2**16)),
    )


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # mosaic_gpu: one setting for every example
    ],
)


def _check(case: Case):
    res = run_case(case)
    assert res.ok, _explain(res) + f"\nreproduce with: {case!r}"


@FUZZ_SETTINGS
@given(fuzz_cases())
def test_fuzz_both_halves(case: Case):
    _check(case)


@settings(FUZZ_SETTINGS, max_examples=MOSAIC_GPU_EXAMPLES)
@given(case=fuzz_cases(MOSAIC_GPU_WIDTHS))
def test_fuzz_mosaic_gpu(case: Case, mosaic_gpu):
    """accel_jax on its Mosaic GPU kernels (conftest's mosaic_gpu), at widths they serve
    (the leading shape decides whether a block of rows fills a program)."""
    res = mosaic_gpu(case)
    assert res.ok, _explain(res) + f"\nreproduce with: {case!r}"
