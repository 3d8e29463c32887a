"""A Llama-style block under tensor and sequence parallelism, run on every rank (see
test_distributed.py): attention and MLP split with ColwiseParallel / RowwiseParallel, the
norms sequence-parallel, alone (1-D mesh) and with FSDP2 (2-D mesh).

The block with TritonRMSNorm must give the loss and gradients of the same block with
torch.nn.RMSNorm under the same plan, of the unsharded block in float64, and issue the
same collectives as the nn.RMSNorm block (the norms add none).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from accel_torch import TritonRMSNorm

DIM, HEADS, BATCH, SEQ = 16, 4, 2, 4  # heads and sequence split over up to 4 ranks
EPS = 1e-6
# fp32 block against float64: error relative to each tensor's largest element (matmuls of
# 16-32 terms, attention softmax, two norms, fp32 throughout).
REL = 2e-5


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        # -1 heads: under ColwiseParallel each rank holds HEADS / tp of them.
        q, k, v = (
            w(x).view(b, s, -1, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, 2 * DIM, bias=False), nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm decoder block; norm is TritonRMSNorm or nn.RMSNorm (same constructor)."""

    def __init__(self, norm):
        super().__init__()
        self.attention_norm, self.ffn_norm = norm(DIM, eps=EPS), norm(DIM, eps=EPS)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


def tp_plan():
    """Megatron-style TP with sequence-parallel norms (torchtitan's Llama plan)."""
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return {
        "attention_norm": SequenceParallel(),
        "attention": gather,
        **{f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")},
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": gather,
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def _state(device):
    """Parameters (norm weights away from 1), a full batch of inputs and a loss target."""
    torch.manual_seed(0)
    block = Block(nn.RMSNorm)
    for norm in (block.attention_norm, block.ffn_norm):
        nn.init.normal_(norm.weight, 1.0, 0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * BATCH, SEQ, DIM, generator=g)
    target = torch.randn(2 * BATCH, SEQ, DIM, generator=g)
    return block.state_dict(), x.to(device), target.to(device)


def _reference(state, x, target):
    """Loss and gradients of the unsharded block in float64 (nn.RMSNorm's math)."""
    block = Block(nn.RMSNorm).double()
    block.load_state_dict(state)
    x = x.cpu().double().requires_grad_(True)
    loss = (block(x) * target.cpu().double()).sum()
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def _run(block, x_local, target_local):
    """Forward and backward of the local loss; the collectives of each."""
    x_local = x_local.detach().requires_grad_(True)
    with CommDebugMode() as fwd:
        loss = (block(x_local) * target_local).sum()
    with CommDebugMode() as bwd:
        loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad for n, p in block.named_parameters()}
    comms = [{op.__name__: n for op, n in c.get_comm_counts().items() if n} for c in (fwd, bwd)]
    return total, x_local.grad, grads, comms


def _assert_close(name, got, want):
    got, want = (t.full_tensor() if isinstance(t, DTensor) else t for t in (got, want))
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    bound = REL * want.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (rank {dist.get_rank()})"


def _check_against(label, result, ref, chunk):
    loss, dx, grads, _comms = result
    ref_loss, ref_dx, ref_grads = ref
    _assert_close(f"{label} loss", loss, ref_loss)
    _assert_close(f"{label} dx", dx, chunk(ref_dx))
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        _assert_close(f"{label} d{name}", grad, ref_grads[name])


def _sharded_blocks(state, mesh, tp_mesh, fsdp):
    blocks = {}
    for label, norm in (("TritonRMSNorm", TritonRMSNorm), ("nn.RMSNorm", nn.RMSNorm)):
        block = Block(norm).to(mesh.device_type)
        block.load_state_dict(state)
        parallelize_module(block, tp_mesh, tp_plan())
        if fsdp:
            fully_shard(block, mesh=mesh["dp"])
        blocks[label] = block
    return blocks


def _check_block(mesh, tp_mesh, dp_rank, dp_size, fsdp):
    state, x, target = _state(mesh.device_type)
    tp_rank, tp_size = tp_mesh.get_local_rank(), tp_mesh.size()

    def chunk(full):  # this rank's part: its batch rows (dp), its sequence slice (tp)
        rows = full.chunk(dp_size, dim=0)[dp_rank]
        return rows.chunk(tp_size, dim=1)[tp_rank].to(mesh.device_type)

    ref_loss, ref_dx, ref_grads = _reference(state, x, target)
    if fsdp:  # FSDP2 averages gradients over the data-parallel ranks
        ref_grads = {n: g / dp_size for n, g in ref_grads.items()}
    results = {
        label: _run(block, chunk(x), chunk(target))
        for label, block in _sharded_blocks(state, mesh, tp_mesh, fsdp).items()
    }
    for label, result in results.items():
        _check_against(label, result, (ref_loss, ref_dx, ref_grads), chunk)
    ours, torchs = results["TritonRMSNorm"], results["nn.RMSNorm"]
    _check_against("TritonRMSNorm vs nn.RMSNorm", ours, torchs[:3], lambda t: t)
    # The norms add no collective: the block's are the plan's, the same as nn.RMSNorm's
    # (TP forward: one all-gather before attention and one before the MLP).
    assert ours[3] == torchs[3], f"collectives {ours[3]} vs nn.RMSNorm's {torchs[3]}"
    if not fsdp:
        assert ours[3][0].get("all_gather_into_tensor") == 2, ours[3]
    for name, grad in ours[2].items():
        want = torchs[2][name].placements
        assert grad.placements == want, f"d{name} placed {grad.placements}, nn.RMSNorm {want}"


def _check_fused_under_sequence_parallel(mesh):
    """SequenceParallel prepares a module's first positional input only: the fused call
    passes the residual stream by keyword, as a DTensor placed like x (docs/distributed.md)."""
    state, x, _target = _state(mesh.device_type)
    norm = TritonRMSNorm(DIM, eps=EPS).to(mesh.device_type)
    norm.weight.data.copy_(state["attention_norm.weight"])
    parallelize_module(norm, mesh, SequenceParallel())
    r = x.flip(0)
    part = x.chunk(mesh.size(), dim=1)[mesh.get_local_rank()]
    residual = DTensor.from_local(
        r.chunk(mesh.size(), dim=1)[mesh.get_local_rank()], mesh, [Shard(1)]
    )
    y, h = norm(part, residual=residual)
    assert y.placements == h.placements == (Shard(1),), (y.placements, h.placements)
    h64 = x.cpu().double() + r.cpu().double()
    w64 = state["attention_norm.weight"].double()
    y64 = h64 * torch.rsqrt(h64.square().mean(-1, keepdim=True) + EPS) * w64
    _assert_close("fused under SequenceParallel: h", h, h64)
    _assert_close("fused under SequenceParallel: y", y, y64)


def check_tp_block(device: str) -> None:
    """TP + SP over all ranks (1-D mesh); the fused norm under SequenceParallel."""
    mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("tp",))
    _check_block(mesh, mesh, 0, 1, fsdp=False)
    _check_fused_under_sequence_parallel(mesh)


def check_fsdp_tp_block(device: str) -> None:
    """FSDP2 over "dp" and TP + SP over "tp" on a 2 x 2 mesh."""
    mesh = init_device_mesh(device, (2, 2), mesh_dim_names=("dp", "tp"))
    _check_block(mesh, mesh["tp"], mesh["dp"].get_local_rank(), 2, fsdp=True)
