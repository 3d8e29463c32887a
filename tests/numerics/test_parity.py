"""Both halves against the float64 reference and each other, from the one case table.

CPU (CI): the small cases, interpreted kernels (accel_jax's Triton-lowered ones, and again
its Mosaic GPU ones). GPU (``-m gpu``): the same small cases compiled (collected unmarked,
so they run there too), the real sizes and the DLPack zero-copy checks.
"""

from __future__ import annotations

import pytest
import torch

from .cases import CPU_CASES, REAL_CASES, Case
from .runner import CaseResult, run_case


def _explain(res: CaseResult) -> str:
    lines = [f"{res.case.name} ({res.case.describe()}):"]
    for c in res.breaches():
        note = f" [{c.note}]" if c.note else ""
        lines.append(f"  {c.name} = {c.value:.4g} {c.unit} > bound {c.bound:g}{note}")
    return "\n".join(lines)


def _assert_case(case: Case) -> CaseResult:
    res = run_case(case)
    assert res.ok, _explain(res)
    return res


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_case(case: Case):
    _assert_case(case)


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_case_mosaic_gpu(case: Case, mosaic_gpu):
    res = mosaic_gpu(case)
    assert res.ok, _explain(res)


@pytest.fixture
def fallback_math():
    """Both packages with interpretation off: on CPU tensors they run their reference math
    (rmsnorm_torch / rmsnorm_reference), the path a CPU user gets by default."""
    import accel_jax
    import accel_torch

    if torch.cuda.is_available():
        pytest.skip("CPU tensors only: on a GPU the kernels run")
    before = accel_torch.interpret_enabled(), accel_jax.get_interpret()
    accel_torch.set_interpret(False)
    accel_jax.set_interpret(False)
    yield
    accel_torch.set_interpret(before[0])
    accel_jax.set_interpret(before[1])


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_case_fallback(case: Case, fallback_math):
    _assert_case(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", REAL_CASES, ids=[c.name for c in REAL_CASES])
def test_real_size(case: Case):
    res = _assert_case(case)
    # Compiled kernels on a GPU: nothing may be waived there.
    assert not res.waived, [c.name for c, _ in res.waived]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dlpack_zero_copy(dtype):
    """torch -> JAX -> torch shares one device buffer, bf16 included, and keeps the bits."""
    from .exchange import ExchangeLog, to_jax, to_torch

    log = ExchangeLog()
    t = torch.randn(512, 4096, device="cuda").to(dtype)
    a = to_jax(t, log, "t")
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = to_torch(a, log, "a")
    assert back.data_ptr() == t.data_ptr()
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    assert log.all_zero_copy(), log.copies()


def test_weight_offset_without_weight_is_an_error():
    """weight None with weight_offset != 0 is a ValueError naming weight_offset, both halves."""
    import jax.numpy as jnp

    import accel_jax
    import accel_torch

    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight_offset"):
        accel_torch.rmsnorm(x, None, weight_offset=1.0)
    with pytest.raises(ValueError, match="weight_offset"):
        accel_jax.rmsnorm(jnp.ones((2, 8)), None, weight_offset=1.0)
    r = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight_offset"):
        accel_torch.rmsnorm_residual_fused(x, r, None, weight_offset=1.0)
    with pytest.raises(ValueError, match="weight_offset"):
        accel_jax.rmsnorm_residual_fused(
            jnp.ones((2, 8)), jnp.ones((2, 8)), None, weight_offset=1.0
        )
