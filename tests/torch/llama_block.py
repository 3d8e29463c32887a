"""A small Llama-style decoder block built on TritonRMSNorm, for compile and graph tests."""

import torch
from torch import nn

from accel_torch import TritonRMSNorm


class LlamaStyleBlock(nn.Module):
    """Pre-norm block: fused residual-add + RMSNorm before attention-like and MLP parts."""

    def __init__(self, hidden: int, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.input_layernorm = TritonRMSNorm(hidden, casting="llama", **kw)
        self.attn = nn.Linear(hidden, hidden, bias=False, **kw)
        self.post_attention_layernorm = TritonRMSNorm(hidden, **kw)
        self.up = nn.Linear(hidden, 2 * hidden, bias=False, **kw)
        self.down = nn.Linear(2 * hidden, hidden, bias=False, **kw)

    def forward(self, x, residual):
        normed, h = self.input_layernorm(x, residual)
        attn = self.attn(normed)
        normed, h = self.post_attention_layernorm(attn, h)
        return self.down(torch.nn.functional.silu(self.up(normed))), h
