"""Fixtures of the numerics suite."""

import jax
import pytest
import torch

from .cases import Case
from .runner import CaseResult, run_case


def _served_by_mosaic_gpu(case: Case) -> bool:
    from accel_jax import kernels_mgpu

    dtypes = [case.x_dtype, case.w_dtype] + ([case.r_dtype, case.h_dtype] if case.fused else [])
    dtypes = [str(d).removeprefix("torch.") for d in dtypes if d is not None]
    return kernels_mgpu.supported(case.rows, case.n, *dtypes)


@pytest.fixture
def mosaic_gpu(monkeypatch):
    """accel_jax on its Mosaic GPU kernels wherever they serve the shape (the rest on the
    Triton-lowered ones): interpreted on the CPU, compiled on Hopper and newer. Returns
    run(case): run_case with the case traced afresh, having checked that the Mosaic GPU
    forward ran exactly where it serves the case."""
    from accel_jax import backends, kernels_mgpu

    if torch.cuda.is_available() and not backends.hopper_or_newer():
        pytest.skip("the Mosaic GPU kernels need compute capability 9.0 or newer")
    if not torch.cuda.is_available() and kernels_mgpu.INTERPRET_UNAVAILABLE:
        pytest.skip(f"no Mosaic GPU interpret mode: {kernels_mgpu.INTERPRET_UNAVAILABLE}")
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "mosaic_gpu")
    traced = []
    forward = kernels_mgpu.rmsnorm_fwd
    monkeypatch.setattr(
        kernels_mgpu, "rmsnorm_fwd", lambda *a, **k: traced.append(1) or forward(*a, **k)
    )

    def run(case: Case) -> CaseResult:
        jax.clear_caches()
        before = len(traced)
        res = run_case(case)
        assert (len(traced) > before) == _served_by_mosaic_gpu(case), case
        return res

    return run
