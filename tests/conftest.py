"""Test setup shared by every suite.

Without a CUDA GPU the kernels can still run, interpreted on the CPU (Triton's interpreter
and Pallas ``interpret=True``). ``ACCEL_INTERPRET=1`` selects that; it must be set before
either package (and Triton) is imported, so it is decided here, first.
"""

import os

import torch  # importing torch does not load Triton, so the flag below still takes effect

if not torch.cuda.is_available():
    os.environ.setdefault("ACCEL_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
