"""Moving tensors between torch and JAX through DLPack, without copying on the GPU.

Inputs are made once in torch; JAX receives the very same buffer, so both halves read
bit-identical bytes. Every exchange is logged with whether the device pointer survived, and
on CUDA a copy is an error (the exchange must be zero-copy there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExchangeLog:
    """Pointer checks of the exchanges made so far: (what, zero_copy) pairs."""

    records: list[tuple[str, bool]] = field(default_factory=list)

    def all_zero_copy(self) -> bool:
        return all(ok for _, ok in self.records)

    def copies(self) -> list[str]:
        return [what for what, ok in self.records if not ok]


def _jax_pointer(arr) -> int:
    return arr.unsafe_buffer_pointer()


def to_jax(t: torch.Tensor, log: ExchangeLog | None = None, what: str = "tensor"):
    """``t`` (contiguous torch tensor, any float dtype incl. bf16) as a JAX array.

    Zero-element tensors are created directly (there are no bytes to share). On CUDA the
    result must alias ``t``'s memory; a copy raises.
    """
    import jax
    import jax.numpy as jnp

    t = t.detach()
    if t.numel() == 0:
        dtype = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}.get(t.dtype)
        dtype = dtype or jnp.dtype(str(t.dtype).removeprefix("torch."))
        return jnp.zeros(tuple(t.shape), dtype)
    arr = jax.dlpack.from_dlpack(t)
    same = _jax_pointer(arr) == t.data_ptr()
    if log is not None:
        log.records.append((f"{what} torch->jax", same))
    if t.is_cuda and not same:
        raise AssertionError(f"DLPack torch->jax copied {what} on CUDA (pointers differ)")
    return arr


def to_torch(arr, log: ExchangeLog | None = None, what: str = "array") -> torch.Tensor:
    """JAX array ``arr`` as a torch tensor sharing its memory (zero-copy on CUDA)."""
    if arr.size == 0:
        import numpy as np

        return torch.from_numpy(np.asarray(arr).astype(np.float32)).to(_torch_dtype(arr.dtype))
    t = torch.from_dlpack(arr)
    same = t.data_ptr() == _jax_pointer(arr)
    if log is not None:
        log.records.append((f"{what} jax->torch", same))
    if t.is_cuda and not same:
        raise AssertionError(f"DLPack jax->torch copied {what} on CUDA (pointers differ)")
    return t


def _torch_dtype(jdtype) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        str(jdtype)
    ]
