"""nn.Module front end: TritonRMSNorm, a drop-in for torch.nn.RMSNorm and Hugging Face's
LlamaRMSNorm (replace.py swaps a model's RMSNorm modules for it)."""

import numbers

import torch
from torch import nn

from .ops import rmsnorm, rmsnorm_residual_fused
from .reference import compute_dtype
from .validation import check_casting, check_eps, check_flag

_MACHINE_EPS = {}  # x's dtype -> the eps that eps=None means, looked up once per dtype


def _machine_eps(dtype: torch.dtype) -> float:
    """torch.nn.RMSNorm's eps=None: the machine epsilon of the dtype torch computes in
    (fp32 for 16-bit inputs, so torch.finfo(x.dtype).eps for fp32 and float64 inputs)."""
    eps = _MACHINE_EPS.get(dtype)
    if eps is None:
        eps = _MACHINE_EPS[dtype] = torch.finfo(compute_dtype(dtype)).eps
    return eps


def _hidden_size(normalized_shape, hidden_size) -> int:
    if (normalized_shape is None) == (hidden_size is None):
        raise TypeError(
            "TritonRMSNorm takes normalized_shape (or its alias hidden_size): exactly one, "
            f"got normalized_shape={normalized_shape!r}, hidden_size={hidden_size!r}"
        )
    size = normalized_shape if hidden_size is None else hidden_size
    if isinstance(size, (tuple, list, torch.Size)):
        if len(size) != 1:
            raise ValueError(
                "normalized_shape (hidden_size): only the last dimension can be normalized, "
                f"got {tuple(size)}"
            )
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"normalized_shape (hidden_size) must be a positive int, got {size!r}")
    return int(size)


class TritonRMSNorm(nn.Module):
    """RMSNorm over the last dimension, with an optional fused residual add.

    A drop-in for ``torch.nn.RMSNorm`` (the same constructor, with the same meanings) and
    for Hugging Face ``LlamaRMSNorm``: the parameter is ``weight`` of shape (N,), so their
    state_dicts load as they are.

    Args:
        normalized_shape: N, the size of the normalized last dimension (an int, or a
            1-tuple). ``hidden_size=`` is accepted as a keyword alias.
        eps: added to the mean square; None (the default) means what it means in
            torch.nn.RMSNorm: the machine epsilon of the dtype the norm computes in, for
            each input (``torch.finfo(x.dtype).eps`` for fp32 and float64 inputs, fp32's
            for 16-bit ones).
        elementwise_affine: learn a weight (initialized to ones, or zeros when
            ``weight_offset`` is 1.0 as in Gemma, where the scale is ``1 + weight``).
        device, dtype: of the weight.
        weight_offset: (keyword-only) added to the weight in fp32.
        casting: (keyword-only) "fp32" or "llama" (see :func:`accel_torch.rmsnorm`).
        residual_dtype: (keyword-only) dtype of h in the fused forward (default x's dtype).

    ``forward(x, residual=None)``: x (..., N) -> y of x's dtype; with a residual of x's shape,
    ``(y, h)`` where ``h = x + residual`` (the new residual stream, in residual_dtype or x's
    dtype) and ``y = rmsnorm(h)``.
    """

    def __init__(
        self,
        normalized_shape=None,
        eps=None,
        elementwise_affine=True,
        device=None,
        dtype=None,
        *,
        hidden_size=None,
        weight_offset=0.0,
        casting="fp32",
        residual_dtype=None,
    ):
        super().__init__()
        self.hidden_size = _hidden_size(normalized_shape, hidden_size)
        self.normalized_shape = (self.hidden_size,)
        self.eps = None if eps is None else check_eps(eps)
        self.weight_offset = float(weight_offset)
        self.casting = check_casting(casting)
        self.residual_dtype = residual_dtype
        self.elementwise_affine = check_flag("elementwise_affine", elementwise_affine)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.hidden_size, device=device, dtype=dtype))
        else:
            if self.weight_offset != 0.0:
                raise ValueError("weight_offset needs elementwise_affine=True (there is no weight)")
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def forward(self, x, residual=None):
        eps = self.eps
        if eps is None:
            eps = _machine_eps(x.dtype) if isinstance(x, torch.Tensor) else 0.0
        if (
            self.weight is None
            and isinstance(x, torch.Tensor)
            and x.shape[-1:] != (self.hidden_size,)
        ):
            raise ValueError(
                f"x's last dimension must be normalized_shape={self.normalized_shape}, "
                f"got x.shape={tuple(x.shape)}"
            )
        if residual is None:
            return rmsnorm(
                x, self.weight, eps, weight_offset=self.weight_offset, casting=self.casting
            )
        return rmsnorm_residual_fused(
            x,
            residual,
            self.weight,
            eps,
            weight_offset=self.weight_offset,
            casting=self.casting,
            return_residual=True,
            residual_dtype=self.residual_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, "
            f"weight_offset={self.weight_offset}, casting={self.casting!r}"
        )
