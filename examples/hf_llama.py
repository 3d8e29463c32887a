"""A tiny Hugging Face Llama trained a few steps with and without ``replace_rmsnorm``.

    python examples/hf_llama.py [--steps 12] [--json curves.json]

The model is built from a config with random weights (nothing is downloaded); the two runs
start from the same weights and see the same batches, so their loss curves differ only by
the RMSNorm implementation. On a CUDA GPU ``accel_torch`` runs its Triton kernels; on a CPU
it runs the same math in plain torch (leave ``ACCEL_INTERPRET`` unset: interpreted kernels
are for testing and far slower).
"""

from __future__ import annotations

import copy
import time

import torch
from curves import parse_args, report
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


def train(models: list[torch.nn.Module], data: list[torch.Tensor], device: str) -> list:
    """AdamW steps of causal-LM loss, the models in turn on each batch (so that neither
    pays the warm-up alone); returns, per model, (loss per step, seconds per step)."""
    opts = [torch.optim.AdamW(m.to(device).train().parameters(), lr=3e-3) for m in models]
    curves = [([], []) for _ in models]
    for ids in data:
        ids = ids.to(device)
        for model, opt, (losses, seconds) in zip(models, opts, curves, strict=True):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # .item() waits for the device
            seconds.append(time.perf_counter() - t0)
    return curves


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    hf = tiny_llama()
    ours = copy.deepcopy(hf)  # the same initial weights
    swapped = accel_torch.replace_rmsnorm(ours)
    data = batches(args.steps, args.batch, args.seq, hf.config.vocab_size)
    (hf_loss, hf_s), (our_loss, our_s) = train([hf, ours], data, device)

    path = "Triton kernels" if device == "cuda" else "plain-torch path (no CUDA)"
    print(f"tiny Llama on {device}, accel_torch: {path}; replace_rmsnorm swapped {int(swapped)}")
    names = ("HF LlamaRMSNorm", "accel_torch")
    return report(
        names, (hf_loss, our_loss), (hf_s, our_s), args.json, device=device, swapped=int(swapped)
    )


if __name__ == "__main__":
    main()
