"""Runs a check on a group of processes, in a subprocess with a time limit.

gloo on the CPU (kernels interpreted, ACCEL_INTERPRET=1) without CUDA; NCCL with one GPU
per rank where there are enough GPUs. A check is ``module:function``, called on every rank
as ``function(mesh_device)`` once the default process group is up; it raises on a failure.
Several checks (comma-separated) share one launch, in order.

    python -m tests.torch.distributed_launch tests.torch.distributed_ops:check_ops 2 PORT
"""

import importlib
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def backend(world_size: int) -> tuple[str, str] | None:
    """(process-group backend, mesh device type), or None where CUDA is present but has
    fewer GPUs than ranks (NCCL needs one GPU per rank)."""
    if not torch.cuda.is_available():
        return "gloo", "cpu"
    if torch.cuda.device_count() >= world_size:
        return "nccl", "cuda"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(world_size: int, checks: str, timeout: float) -> str:
    """Run checks ("module:function,...") on world_size ranks; returns their output.

    Raises AssertionError with the output's tail if a rank fails or the run takes longer
    than timeout seconds (then the whole process group of the run is killed).
    """
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("ACCEL_INTERPRET", "1")
    if env.get("ACCEL_INTERPRET") == "1":  # the checks' imports may load Triton first
        env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", __name__, checks, str(world_size), str(_free_port())]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends every rank
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"{checks} on {world_size} ranks: over {timeout} s\n{out[-8000:]}"
        ) from None
    assert proc.returncode == 0, f"{checks} on {world_size} ranks failed:\n{out[-8000:]}"
    return out


def _rank_main(rank: int, checks: str, world_size: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    pg_backend, device = backend(world_size)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(pg_backend, rank=rank, world_size=world_size)
    try:
        for check in checks.split(","):
            module, function = check.split(":")
            getattr(importlib.import_module(module), function)(device)
    except BaseException:
        # printed before the group is torn down: a rank that fails while others still wait
        # in a collective can abort inside destroy_process_group, losing the traceback
        print(f"rank {rank} failed in {check}:\n{traceback.format_exc()}", flush=True)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    checks, world_size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.multiprocessing.spawn(_rank_main, args=(checks, world_size, port), nprocs=world_size)
