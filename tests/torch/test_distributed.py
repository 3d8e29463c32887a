"""accel_torch on DTensors across processes: gloo groups of 2 and 4 ranks on the CPU
(kernels interpreted), NCCL with one GPU per rank where there are enough GPUs.

Each test launches one group (tests/torch/distributed_launch.py) that runs many checks
(tests/torch/distributed_ops.py, distributed_block.py) under a time limit;
``-m distributed`` selects them.
"""

import subprocess
import sys

import pytest
import torch

from .distributed_launch import REPO, backend, run_on_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]


def _run(world_size: int, checks: list[str], timeout: float) -> None:
    if backend(world_size) is None:
        pytest.skip(f"NCCL needs {world_size} GPUs, found {torch.cuda.device_count()}")
    run_on_ranks(world_size, ",".join(f"tests.torch.distributed_{c}" for c in checks), timeout)


def test_two_ranks_ops_and_tensor_parallel_block():
    """Forward, fused forward, backward on Shard(0), Shard(1), Shard(-1), Replicate (kernels
    and reference math, eager and compiled: values, placements, collectives); the
    Llama-style block under TP + SP against nn.RMSNorm and float64."""
    _run(2, ["ops:check_ops", "block:check_tp_block"], timeout=300)


def test_four_ranks_2d_mesh_ops_and_fsdp_tensor_parallel_block():
    """The per-op checks with pairs of placements on a 2 x 2 mesh; the block under FSDP2
    ("dp") and TP + SP ("tp")."""
    _run(4, ["ops:check_ops_2d", "block:check_fsdp_tp_block"], timeout=300)


_IMPORT_ORDER = """
import sys
import accel_torch
assert "torch.distributed.tensor" not in sys.modules, "import accel_torch loaded DTensor"
from torch.distributed.tensor import DTensor
strategies = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
import torch
for name in ("rmsnorm_fwd", "rmsnorm_residual_fwd", "rmsnorm_bwd"):
    assert getattr(torch.ops.accel_torch, name).default in strategies, name
"""


def test_rules_register_when_dtensor_is_imported_later():
    """import accel_torch leaves DTensor unloaded (it costs most of a second) and the rules
    are in place as soon as something imports it."""
    subprocess.run([sys.executable, "-c", _IMPORT_ORDER], check=True, timeout=120, cwd=REPO)
