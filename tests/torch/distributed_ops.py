"""Per-op DTensor checks, run on every rank (see test_distributed.py).

Forward, fused forward and backward of DTensor inputs placed Shard(0), Shard(1), Shard(-1)
or Replicate (and pairs of these on a 2-D mesh), through the kernels (the custom ops and
their sharding rules) and through the reference math, eager and under torch.compile:
values and gradients against float64, the placement of every output and gradient, and the
collectives each call issues.
"""

import torch
import torch.distributed as dist
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.distributed.tensor import (
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
)
from torch.distributed.tensor.debug import CommDebugMode

import accel_torch

from .helpers import assert_grad_close, assert_within_ulp, dx_scale, leaf64, rmsnorm64

REL = 1e-5  # fp32 arithmetic error relative to a gradient's scale, as in test_backward.py
EPS = 1e-6
SHAPE = (4, 6, 8)  # (batch, sequence, hidden): every dim splits over 2 ranks
PLACEMENTS_1D = [(Shard(0),), (Shard(1),), (Shard(-1),), (Replicate(),)]
PLACEMENTS_2D = [(Shard(0), Shard(1)), (Shard(1), Shard(-1)), (Replicate(), Shard(0))]
ALL_GATHER = "all_gather_into_tensor"


def _inputs(device):
    """bf16 x and dy, an fp32 residual stream and its gradient, an fp32 weight."""
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(SHAPE, generator=g).mul(2).to(torch.bfloat16),
        "r": torch.randn(SHAPE, generator=g),
        "w": 1 + 0.3 * torch.randn(SHAPE[-1], generator=g),
        "dy": torch.randn(SHAPE, generator=g).to(torch.bfloat16),
        "dh": torch.randn(SHAPE, generator=g),
    }
    return {k: v.to(device) for k, v in t.items()}


def _is_row_shard(p, ndim: int) -> bool:
    return p.is_shard() and p.dim % ndim != ndim - 1


def _kernel_placements(placements, ndim: int):
    """What the rules give: row shardings kept, a sharded last dim replicated."""
    return tuple(p if _is_row_shard(p, ndim) else Replicate() for p in placements)


def _dweight_placements(placements, ndim: int):
    return tuple(Partial("sum") if _is_row_shard(p, ndim) else Replicate() for p in placements)


def _normalized(placements, ndim: int):
    return tuple(Shard(p.dim % ndim) if p.is_shard() else p for p in placements)


def _gathers(placements, ndim: int) -> dict:
    """The collectives of one call on the kernels: an all-gather per mesh dim sharding N."""
    n = sum(p.is_shard() and not _is_row_shard(p, ndim) for p in placements)
    return {ALL_GATHER: n} if n else {}


def _comms(mode: CommDebugMode) -> dict:
    return {op.__name__: n for op, n in mode.get_comm_counts().items() if n}


def _where(path, placements) -> str:
    return f"[{path}, x placed {placements}, rank {dist.get_rank()}]"


def _check_placements(name, tensor, expected, where):
    assert tuple(tensor.placements) == tuple(expected), (
        f"{where} {name} placed {tensor.placements}, expected {expected}"
    )


def _rmsnorm_reference(t):
    x64, w64 = leaf64(t["x"]), leaf64(t["w"])
    y64 = rmsnorm64(x64, w64, EPS)
    return (y64, *torch.autograd.grad(y64, [x64, w64], t["dy"].double()))


def _fused_reference(t):
    x64, r64, w64 = leaf64(t["x"]), leaf64(t["r"]), leaf64(t["w"])
    h64 = x64 + r64
    # Normalize the fp32-rounded h the op normalizes; rounding is identity for gradients.
    h64 = h64 + ((t["x"].double() + t["r"].double()).float().double() - h64).detach()
    y64 = rmsnorm64(h64, w64, EPS)
    grads = torch.autograd.grad([y64, h64], [x64, r64, w64], [t["dy"].double(), t["dh"].double()])
    return (y64, h64, *grads)


def _check_rmsnorm(fn, mesh, placements, t, path):
    where = _where(path, placements)
    ndim = len(SHAPE)
    xd = distribute_tensor(t["x"], mesh, placements).requires_grad_(True)
    wd = distribute_tensor(t["w"], mesh, [Replicate()] * mesh.ndim).requires_grad_(True)
    with CommDebugMode() as fwd:
        y = fn(xd, wd, EPS)
    dyd = distribute_tensor(t["dy"], mesh, y.placements)
    with CommDebugMode() as bwd:
        y.backward(dyd)
    y64, dx64, dw64 = _rmsnorm_reference(t)
    assert_within_ulp(y.full_tensor(), y64)
    assert_grad_close(xd.grad.full_tensor(), dx64, REL, dx_scale(t["x"], t["w"], t["dy"]))
    assert_grad_close(wd.grad.full_tensor(), dw64, REL)
    rows_only = all(_is_row_shard(p, ndim) or p.is_replicate() for p in placements)
    if path != "reference":
        expected = _kernel_placements(placements, ndim)
        _check_placements("y", y, expected, where)
        _check_placements("dx", xd.grad, expected, where)
        _check_placements("dweight", wd.grad, _dweight_placements(placements, ndim), where)
        # Rows stay where they are: no collective at all. A sharded last dim is gathered
        # in the forward and again in the backward (autograd saved x as it came), one
        # all-gather per mesh dim that shards it.
        expected = _gathers(placements, ndim)
        assert _comms(fwd) == _comms(bwd) == expected, (where, _comms(fwd), _comms(bwd))
    elif rows_only:  # torch ops on DTensors keep rows local too (DTensor's own rules)
        _check_placements("y", y, _normalized(placements, ndim), where)
        assert _comms(fwd) == _comms(bwd) == {}, (where, _comms(fwd), _comms(bwd))


def _check_fused(fn, mesh, placements, t, path):
    where = _where(path, placements)
    ndim = len(SHAPE)
    xd = distribute_tensor(t["x"], mesh, placements).requires_grad_(True)
    rd = distribute_tensor(t["r"], mesh, placements).requires_grad_(True)
    wd = distribute_tensor(t["w"], mesh, [Replicate()] * mesh.ndim).requires_grad_(True)
    with CommDebugMode() as fwd:
        y, h = fn(xd, rd, wd, EPS, return_residual=True, residual_dtype=torch.float32)
    grads = [distribute_tensor(t[k], mesh, out.placements) for k, out in (("dy", y), ("dh", h))]
    with CommDebugMode() as bwd:
        torch.autograd.backward([y, h], grads)
    y64, h64, dx64, dr64, dw64 = _fused_reference(t)
    assert y.dtype == torch.bfloat16 and h.dtype == rd.grad.dtype == torch.float32
    assert_within_ulp(y.full_tensor(), y64)
    assert_within_ulp(h.full_tensor(), h64)
    h32 = (t["x"].double() + t["r"].double()).float()
    scale = dx_scale(h32, t["w"], t["dy"]) + t["dh"].abs().max().item()
    assert_grad_close(xd.grad.full_tensor(), dx64, REL, scale)
    assert_grad_close(rd.grad.full_tensor(), dr64, REL, scale)
    assert_grad_close(wd.grad.full_tensor(), dw64, REL)
    if path != "reference":
        expected = _kernel_placements(placements, ndim)
        for name, out in (("y", y), ("h", h), ("dx", xd.grad), ("dresidual", rd.grad)):
            _check_placements(name, out, expected, where)
        _check_placements("dweight", wd.grad, _dweight_placements(placements, ndim), where)
        if all(_is_row_shard(p, ndim) or p.is_replicate() for p in placements):
            assert _comms(fwd) == _comms(bwd) == {}, (where, _comms(fwd), _comms(bwd))


def _check_bwd_op(mesh, placements, t):
    """The backward op called directly: absent outputs Replicate, and the placements
    follow dres_dtype (an argument DTensor must key its cached decisions on)."""
    where = _where("rmsnorm_bwd", placements)
    ndim = len(SHAPE)
    xd, dyd = (distribute_tensor(t[k], mesh, placements) for k in ("x", "dy"))
    wd = distribute_tensor(t["w"], mesh, [Replicate()] * mesh.ndim)
    rows = _kernel_placements(placements, ndim)
    replicated = (Replicate(),) * mesh.ndim
    _y, rstd = torch.ops.accel_torch.rmsnorm_fwd(xd, wd, EPS, 0.0, False)
    _check_placements("rstd", rstd, rows, where)
    ops = torch.ops.accel_torch.rmsnorm_bwd
    dx, dres, dw = ops(dyd, xd, None, rstd, None, 0.0, None)
    _check_placements("dx", dx, rows, where)
    _check_placements("absent dres", dres, replicated, where)
    _check_placements("absent dweight", dw, replicated, where)
    assert dres.shape == dw.shape == (0,)
    dweight_placed = _dweight_placements(placements, ndim)
    _y64, dx64, dw64 = _rmsnorm_reference(t)
    for dres_dtype in (None, torch.float32):  # the same tensors, only dres_dtype differs
        dx, dres, dw = ops(dyd, xd, wd, rstd, None, 0.0, dres_dtype)
        _check_placements("dweight", dw, dweight_placed, where)
        if dres_dtype is None:
            _check_placements("absent dres", dres, replicated, where)
            assert dres.shape == (0,)
        else:
            _check_placements("dres", dres, rows, where)
            assert dres.dtype == torch.float32
            assert_grad_close(dres.full_tensor(), dx64, REL, dx_scale(t["x"], t["w"], t["dy"]))
        assert_grad_close(dx.full_tensor(), dx64, REL, dx_scale(t["x"], t["w"], t["dy"]))
        assert_grad_close(dw.full_tensor(), dw64, REL)


def _graph_collectives(graphs) -> dict:
    counts = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            name = str(node.target)
            if node.op == "call_function" and "c10d_functional" in name and "wait" not in name:
                counts[name.split(".")[1]] = counts.get(name.split(".")[1], 0) + 1
    return counts


def _check_compiled(mesh, placements, t):
    """torch.compile(fullgraph=True) over the public functions on DTensors: the same values
    and the collectives in the compiled forward and backward graphs."""
    where = _where("compiled", placements)
    ndim = len(SHAPE)
    graphs = []

    def keep(gm, _example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    fn = torch.compile(accel_torch.rmsnorm, backend=backend, fullgraph=True)
    xd = distribute_tensor(t["x"], mesh, placements).requires_grad_(True)
    wd = distribute_tensor(t["w"], mesh, [Replicate()] * mesh.ndim).requires_grad_(True)
    y = fn(xd, wd, EPS)
    y.backward(distribute_tensor(t["dy"], mesh, y.placements))
    y64, dx64, dw64 = _rmsnorm_reference(t)
    assert_within_ulp(y.full_tensor(), y64)
    assert_grad_close(xd.grad.full_tensor(), dx64, REL, dx_scale(t["x"], t["w"], t["dy"]))
    assert_grad_close(wd.grad.full_tensor(), dw64, REL)
    _check_placements("y", y, _kernel_placements(placements, ndim), where)
    _check_placements("dweight", wd.grad, _dweight_placements(placements, ndim), where)
    assert len(graphs) == 2, f"{where} expected one forward and one backward graph"
    assert [_graph_collectives([g]) for g in graphs] == [_gathers(placements, ndim)] * 2, (
        where,
        [_graph_collectives([g]) for g in graphs],
    )


def _check_path(path, mesh, placements, t):
    if path == "reference":
        _check_rmsnorm(accel_torch.rmsnorm_torch, mesh, placements, t, path)
        _check_fused(accel_torch.rmsnorm_residual_torch, mesh, placements, t, path)
    else:
        _check_rmsnorm(accel_torch.rmsnorm, mesh, placements, t, path)
        _check_fused(accel_torch.rmsnorm_residual_fused, mesh, placements, t, path)


def _check_all(mesh, placement_sets, t, compiled):
    """Paths: "ops", the public functions, whose DTensor inputs take the custom ops and
    their rules, on the kernels (CUDA, or interpreted on the CPU); "ops, kernels off", the
    same with the CPU interpreter off (the ops run the reference math inside); "reference",
    rmsnorm_torch: torch ops on DTensors."""
    interpreted = accel_torch.interpret_enabled()
    for placements in placement_sets:
        _check_path("ops", mesh, placements, t)
        _check_path("reference", mesh, placements, t)
        if interpreted:
            accel_torch.set_interpret(False)
            try:
                _check_path("ops, kernels off", mesh, placements, t)
            finally:
                accel_torch.set_interpret(True)
        _check_bwd_op(mesh, placements, t)
        if placements in compiled:
            _check_compiled(mesh, placements, t)


def check_ops(device: str) -> None:
    """1-D mesh over all ranks: every placement, eager; compiled for Shard(1), Shard(-1)."""
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    _check_all(mesh, PLACEMENTS_1D, _inputs(device), [(Shard(1),), (Shard(-1),)])


def check_ops_2d(device: str) -> None:
    """2 x 2 mesh: pairs of placements, eager."""
    mesh = init_device_mesh(device, (2, 2))
    _check_all(mesh, PLACEMENTS_2D, _inputs(device), [])
