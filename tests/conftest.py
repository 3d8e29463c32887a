"""Test setup shared by every suite.

Without a CUDA GPU the kernels can still run, interpreted on the CPU (Triton's interpreter
and Pallas ``interpret=True``). ``ACCEL_INTERPRET=1`` selects that; it must be set before
either package (and Triton) is imported, so it is decided here, first.

Each half's tests need only their own framework: where torch or JAX is not installed, the
suites that need it are left out of collection (named in pytest's header), so a
PyTorch-only or a JAX-only install runs its half alone.
"""

import os
import shutil
from importlib.util import find_spec

HAS_TORCH = find_spec("torch") is not None
HAS_JAX = find_spec("jax") is not None and find_spec("flax") is not None


def _has_cuda() -> bool:
    if HAS_TORCH:
        import torch  # importing torch does not load Triton, so the flag below still works

        return torch.cuda.is_available()
    # JAX-only: decide before JAX is imported (JAX_PLATFORMS must be set first).
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("ACCEL_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402

# Folders (relative to tests/) that need a framework, by the framework they need. The
# numerics suite compares both halves and the benchmark's tests time both: they need both.
_NEEDS = {"torch": ["torch", "numerics", "bench"], "jax": ["jax", "numerics", "bench"]}
MISSING = [fw for fw, present in (("torch", HAS_TORCH), ("jax", HAS_JAX)) if not present]
collect_ignore = sorted({p for fw in MISSING for p in _NEEDS[fw]})


def pytest_report_header(config):
    if MISSING:
        return (
            f"not installed: {', '.join(MISSING)}; left out: {', '.join(collect_ignore)} "
            "(the other half's tests run alone)"
        )
    return None


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
