"""torch.compile(fullgraph=True) over a Llama-style block: no graph break, same numbers."""

import pytest
import torch

from .conftest import needs_interpreter
from .llama_block import LlamaStyleBlock


def _run(block, x, r):
    out, h = block(x, r)
    loss = out.float().square().sum() + h.float().sum()
    grads = torch.autograd.grad(loss, [x, r, *block.parameters()])
    return out, h, grads


def _check_compiled_matches_eager(backend):
    torch.manual_seed(0)
    block = LlamaStyleBlock(64)
    x = torch.randn(2, 5, 64, requires_grad=True)
    r = torch.randn(2, 5, 64, requires_grad=True)
    eager = _run(block, x, r)
    torch._dynamo.reset()
    compiled_block = torch.compile(block, fullgraph=True, backend=backend)  # a break raises
    compiled = _run(compiled_block, x, r)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_over_fallback(torch_fallback, backend):
    _check_compiled_matches_eager(backend)


@needs_interpreter
def test_compile_fullgraph_over_interpreted_kernel_ops():
    _check_compiled_matches_eager("aot_eager")
