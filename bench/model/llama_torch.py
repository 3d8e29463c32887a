"""The Hugging Face Llama under test and its three RMSNorm variants.

One model is built (random weights, nothing downloaded) and its norm modules are swapped
in place between variants, so every variant runs the same weights (the same Parameters):

- ``hf``: Hugging Face's ``LlamaRMSNorm`` (eager torch ops);
- ``accel``: ``accel_torch.replace_rmsnorm(model)`` (``PromotingRMSNorm``: a
  ``TritonRMSNorm`` with casting "llama");
- ``liger``: ``liger_kernel.transformers.LigerRMSNorm`` built as Liger's
  ``apply_liger_kernel_to_llama(rms_norm=True, model=...)`` configures each norm (offset 0,
  casting_mode "llama", in_place=True), holding the original weight.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

import accel_torch  # before transformers, which may import Triton (ACCEL_INTERPRET must lead)
from bench.model.configs import Shape

VARIANTS = ("hf", "accel", "liger")
LABELS = {
    "hf": "HF LlamaRMSNorm",
    "accel": "accel_torch (replace_rmsnorm)",
    "liger": "Liger LigerRMSNorm",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def liger_missing() -> str | None:
    """None if Liger-Kernel's RMSNorm imports, else why not."""
    try:
        importlib.import_module("liger_kernel.transformers.rms_norm")
    except Exception as e:  # not installed, or installed without a usable Triton
        return f"liger_kernel: {type(e).__name__}: {e} (pip install liger-kernel)"
    return None


def build_llama(shape: Shape, layers: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``shape`` with ``layers`` decoder layers, random weights,
    parameters in ``dtype`` on ``device``, SDPA attention, train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.eps,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else previous)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # Parameters are created in dtype (the rotary inv_freq buffer stays fp32, as HF makes it).
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"parameters built in {wrong}, not {dtype}")
    return model.train()


class NormSwitch:
    """Swaps the norm modules of a Llama between the variants, in place.

    ``NormSwitch(model)`` records the model's ``LlamaRMSNorm`` modules (by path);
    ``use(variant)`` puts that variant's modules in their places (all holding the original
    weights) and returns them; ``norms()`` lists the modules now in place.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.original = {
            path: m for path, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"
        }
        if not self.original:
            raise ValueError("the model has no LlamaRMSNorm modules")
        self.variant = "hf"

    def _put(self, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(self.model.get_submodule(parent), name, module)

    def norms(self) -> list[nn.Module]:
        return [self.model.get_submodule(path) for path in self.original]

    def use(self, variant: str) -> list[nn.Module]:
        """Put ``variant``'s norms in place; raises ValueError for an unknown variant and
        RuntimeError when the swap does not cover every norm."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        for path, module in self.original.items():
            self._put(path, module)
        if variant == "accel":
            swapped = accel_torch.replace_rmsnorm(self.model)
            if int(swapped) != len(self.original):
                raise RuntimeError(
                    f"replace_rmsnorm swapped {int(swapped)} of {len(self.original)} norms:\n"
                    + swapped.report()
                )
        elif variant == "liger":
            for path, module in self.original.items():
                self._put(path, _liger_norm(module))
        self.variant = variant
        return self.norms()


def _liger_norm(hf_norm: nn.Module) -> nn.Module:
    """A LigerRMSNorm configured as Liger's Llama patch configures one, with hf_norm's
    weight (the same Parameter) and eps."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    wanted = dict(eps=hf_norm.variance_epsilon, offset=0.0, casting_mode="llama", in_place=True)
    accepted = inspect.signature(LigerRMSNorm.__init__).parameters
    norm = LigerRMSNorm(
        hf_norm.weight.shape[0], **{k: v for k, v in wanted.items() if k in accepted}
    )
    norm.weight = hf_norm.weight
    return norm.train(hf_norm.training)


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward gives its KV cache argument (``cache`` in recent
    transformers, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
