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

# log10 of the value scale, per dtype: wide for the fp32-range formats; fp16 stays clear of
# its max (65504) and of the subnormal range, which the table covers on purpose.
SCALES = {"float32": (-15, 15), "bfloat16": (-15, 15), "float16": (-2, 3)}


@st.composite
def fuzz_cases(draw) -> Case:
    dtype = draw(st.sampled_from(["bfloat16", "float16", "float32"]))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    if not lead or draw(st.booleans()):
        lead = lead + (draw(st.integers(1, 12)),)
    n = draw(st.one_of(st.integers(1, 70), st.integers(71, 1100)))
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


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fuzz_cases())
def test_fuzz_both_halves(case: Case):
    res = run_case(case)
    assert res.ok, _explain(res) + f"\nreproduce with: {case!r}"
