"""A tiny Hugging Face Llama trained a few steps with and without ``replace_rmsnorm``.

    python examples/hf_llama.py [--steps 12] [--json curves.json]

The model is built from a config with random weights (nothing is downloaded); the two runs
start from the same weights and see the same batches, so their loss curves differ only by
the RMSNorm implementation. On a CUDA GPU ``accel_torch`` runs its Triton kernels; on a CPU
it runs the same math in plain torch (leave ``ACCEL_INTERPRET`` unset: interpreted kernels
are for testing and far slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import accel_torch


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, vocabulary 128) with random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    return LlamaForCausalLM(config)


def batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list[torch.Tensor]:
    """(batch, seq) int64 token ids: each row counts up by a fixed stride from a random start,
    a pattern the model can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        out.append((start + 3 * torch.arange(seq)) % vocab)
    return out


def train(model: torch.nn.Module, data: list[torch.Tensor], device: str) -> tuple[list, list]:
    """AdamW steps of causal-LM loss; returns (loss per step, seconds per step)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, seconds = [], []
    for ids in data:
        ids = ids.to(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() waits for the device
        seconds.append(time.perf_counter() - t0)
    return losses, seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the two curves to this file")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    hf = tiny_llama()
    ours = copy.deepcopy(hf)  # the same initial weights
    swapped = accel_torch.replace_rmsnorm(ours)
    data = batches(args.steps, args.batch, args.seq, hf.config.vocab_size)
    hf_loss, hf_s = train(hf, data, device)
    our_loss, our_s = train(ours, data, device)

    path = "Triton kernels" if device == "cuda" else "plain-torch path (no CUDA)"
    print(f"tiny Llama on {device}, accel_torch: {path}; replace_rmsnorm swapped {int(swapped)}")
    print(f"{'step':>4}  {'HF LlamaRMSNorm':>15}  {'accel_torch':>11}  {'difference':>10}")
    for i, (a, b) in enumerate(zip(hf_loss, our_loss, strict=True)):
        print(f"{i:>4}  {a:>15.6f}  {b:>11.6f}  {b - a:>10.2e}")
    # The first step compiles / warms up: the median of the others is the step time.
    hf_ms, our_ms = (1e3 * statistics.median(s[1:] or s) for s in (hf_s, our_s))
    print(f"time per step: HF {hf_ms:.1f} ms, accel_torch {our_ms:.1f} ms")
    result = {
        "device": device,
        "swapped": int(swapped),
        "reference": hf_loss,
        "accel": our_loss,
        "reference_ms": hf_ms,
        "accel_ms": our_ms,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
