"""The compiled kernels on a CUDA GPU at real sizes (marked gpu: skipped without CUDA)."""

import pytest
import torch

import accel_torch

from .helpers import (
    assert_grad_close,
    assert_llama_matches_hf,
    assert_within_ulp,
    dx_scale,
    leaf64,
    rmsnorm64,
)
from .llama_block import LlamaStyleBlock

pytestmark = pytest.mark.gpu

REAL_SHAPES = [
    (2048, 4096),
    (4096, 16384),
    (8, 5120),
    (8, 7168),
    (4, 65536),
    (2, 131072),
    (3, 1000),
    (257, 3584),  # rows in three parts; dweight by column programs, a ragged last tile
    (600, 6144),  # two parts; dweight by partials
    (512, 4608),
]
REL = 1e-5  # as in test_backward: fp32 arithmetic relative to the terms' size


def _make(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda").mul(2).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g, device="cuda")).to(dtype)
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    return x, w, dy


@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_backward_real_sizes(shape, dtype):
    x, w, dy = _make(shape, dtype)
    assert_within_ulp(accel_torch.rmsnorm(x, w), rmsnorm64(x, w))
    assert_llama_matches_hf(accel_torch.rmsnorm(x, w, casting="llama"), x, w)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    dx, dw = torch.autograd.grad(accel_torch.rmsnorm(xg, wg), [xg, wg], dy)
    x64, w64 = leaf64(x), leaf64(w)
    ref = torch.autograd.grad(rmsnorm64(x64, w64), [x64, w64], dy.double())
    assert_grad_close(dx, ref[0], REL, dx_scale(x, w, dy))
    assert_grad_close(dw, ref[1], REL)


@pytest.mark.parametrize("shape", [(2048, 4096), (8192, 4096), (2, 131072)])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_fused_real_sizes(shape, residual_dtype):
    x, w, dy = _make(shape, torch.bfloat16, seed=1)
    r = torch.randn(shape, device="cuda").to(residual_dtype or x.dtype)
    xg, rg, wg = (t.clone().requires_grad_(True) for t in (x, r, w))
    y, h = accel_torch.rmsnorm_residual_fused(
        xg, rg, wg, return_residual=True, residual_dtype=residual_dtype
    )
    assert torch.equal(h, (x.double() + r.double()).to(h.dtype))
    assert_within_ulp(y, rmsnorm64(h.detach(), w))
    dx, dr, dw = torch.autograd.grad([y], [xg, rg, wg], [dy])
    h64 = leaf64(h)
    w64 = leaf64(w)
    ref = torch.autograd.grad(rmsnorm64(h64, w64), [h64, w64], dy.double())
    scale = dx_scale(h, w, dy)
    assert_grad_close(dx, ref[0], REL, scale)
    assert_grad_close(dr, ref[0], REL, scale)
    assert_grad_close(dw, ref[1], REL)


def test_dweight_bitwise_deterministic_on_gpu():
    x, w, dy = _make((8192, 4096), torch.bfloat16, seed=2)
    runs = []
    for _ in range(3):
        wg = w.clone().requires_grad_(True)
        runs.append(torch.autograd.grad(accel_torch.rmsnorm(x, wg), [wg], dy)[0])
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_strided_rows_and_nan_isolation_on_gpu():
    big = torch.randn(64, 6000, device="cuda", dtype=torch.bfloat16)
    x = big[:, 100:4196]
    x[3, 7] = float("nan")
    x[4] = 0
    y = accel_torch.rmsnorm(x)
    assert y[3].isnan().all() and torch.equal(y[4], torch.zeros_like(y[4]))
    keep = [i for i in range(64) if i != 3]
    assert_within_ulp(y[keep], rmsnorm64(x[keep]))


def test_compile_llama_block_fullgraph_inductor():
    torch.manual_seed(0)
    block = LlamaStyleBlock(1024, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 128, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    out, h = block(x, r)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # raises on any graph break
    out_c, h_c = compiled(x, r)
    torch.testing.assert_close(out_c, out, rtol=2e-2, atol=2e-2)
    (out_c.float().square().mean() + h_c.float().mean()).backward()
    assert x.grad is not None and block.input_layernorm.weight.grad is not None
    explanation = torch._dynamo.explain(block)(x, r)
    assert explanation.graph_break_count == 0


def test_cuda_graph_capture_and_replay():
    x, w, dy = _make((2048, 4096), torch.bfloat16, seed=3)
    r = torch.randn_like(x)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) outside the capture
        for _ in range(2):
            y = accel_torch.rmsnorm_residual_fused(xg, r, wg)
            torch.autograd.grad(y, [xg, wg], dy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = accel_torch.rmsnorm_residual_fused(xg, r, wg)
        dx, dw = torch.autograd.grad(y, [xg, wg], dy)
    with torch.no_grad():  # new inputs, same buffers: the replay must see them
        xg.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
    graph.replay()
    torch.cuda.synchronize()
    h = (xg.detach().double() + r.double()).to(torch.bfloat16)
    assert_within_ulp(y, rmsnorm64(h, w))
    h64, w64 = leaf64(h), leaf64(w)
    ref = torch.autograd.grad(rmsnorm64(h64, w64), [h64, w64], dy.double())
    assert_grad_close(dx, ref[0], REL, dx_scale(h, w, dy))
    assert_grad_close(dw, ref[1], REL)


def test_more_than_two_to_the_31_elements():
    """2^31 + 32768 bf16 elements: offsets past int32 in every kernel (forward, fused,
    backward, the dweight reduction). dy is zero except on the checked rows, so dx must be
    exactly zero elsewhere (an unwritten or misplaced row shows) and dweight is theirs."""
    n = 4096
    m = 2**31 // n + 8
    rows = [0, m // 2, m - 1]
    x = torch.empty(m, n, device="cuda", dtype=torch.bfloat16).normal_(0, 2)
    w = (1 + 0.3 * torch.randn(n, device="cuda")).to(torch.bfloat16)
    xg, wg = x.requires_grad_(True), w.clone().requires_grad_(True)
    y = accel_torch.rmsnorm(xg, wg)
    assert_within_ulp(y[rows], rmsnorm64(x[rows].detach(), w))
    dy = torch.zeros_like(y)
    dy[rows] = torch.randn(len(rows), n, device="cuda").to(torch.bfloat16)
    dx, dw = torch.autograd.grad(y, [xg, wg], dy)
    del y
    x64, w64 = leaf64(x[rows]), leaf64(w)
    ref = torch.autograd.grad(rmsnorm64(x64, w64), [x64, w64], dy[rows].double())
    assert_grad_close(dx[rows], ref[0], REL, dx_scale(x[rows], w, dy[rows]))
    assert torch.count_nonzero(dx) == torch.count_nonzero(dx[rows])
    assert_grad_close(dw, ref[1], REL)
    del dx, dy
    x = x.detach()
    r = torch.empty_like(x).normal_()
    y, h = accel_torch.rmsnorm_residual_fused(x, r, w, return_residual=True)
    assert torch.equal(h[rows], (x[rows].double() + r[rows].double()).to(torch.bfloat16))
    assert_within_ulp(y[rows], rmsnorm64(h[rows], w))
