# ruff: noqa: E501  (a table of cases, one per line)
"""Bad input: a clear ValueError/TypeError naming the argument, never a wrong result."""

import math

import pytest
import torch

import accel_torch
from accel_torch import TritonRMSNorm


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: accel_torch.rmsnorm(_x(2, 8), _x(7)), ValueError, ["weight", "(8,)", "(7,)"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), _x(2, 8)), ValueError, ["weight", "(2, 8)"]),
        (lambda: accel_torch.rmsnorm(torch.ones(2, 8, dtype=torch.int32)), TypeError, ["x", "int32"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), torch.ones(8, dtype=torch.int64)), TypeError, ["weight", "int64"]),
        (lambda: accel_torch.rmsnorm(_x(2, 0)), ValueError, ["N", "(2, 0)"]),
        (lambda: accel_torch.rmsnorm(torch.tensor(1.0)), ValueError, ["x", "dimension"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), eps=-1e-6), ValueError, ["eps"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), eps=math.nan), ValueError, ["eps"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), eps=math.inf), ValueError, ["eps"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), eps="1e-6"), TypeError, ["eps"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), casting="bf16"), ValueError, ["casting", "bf16"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), weight_offset=1.0), ValueError, ["weight_offset"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), _x(8), weight_offset=math.inf), ValueError, ["weight_offset"]),
        (lambda: accel_torch.rmsnorm([1.0, 2.0]), TypeError, ["x", "list"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), torch.ones(8, device="meta")), ValueError, ["weight", "device"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), _x(2, 7)), ValueError, ["residual", "(2, 7)", "(2, 8)"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), _x(8)), ValueError, ["residual", "(8,)"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), torch.ones(2, 8, dtype=torch.int32)), TypeError, ["residual", "int32"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), torch.ones(2, 8, device="meta")), ValueError, ["residual", "device"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), _x(2, 8), residual_dtype=torch.int8), TypeError, ["residual_dtype"]),
        (lambda: accel_torch.rmsnorm_torch(_x(2, 8), _x(9)), ValueError, ["weight", "(8,)"]),
        (lambda: TritonRMSNorm(0), ValueError, ["hidden_size"]),
        (lambda: TritonRMSNorm((4, 4)), ValueError, ["hidden_size"]),
        (lambda: TritonRMSNorm(8, eps=-1.0), ValueError, ["eps"]),
        (lambda: TritonRMSNorm(8, casting="x"), ValueError, ["casting"]),
        (lambda: TritonRMSNorm(8, elementwise_affine=False, weight_offset=1.0), ValueError, ["weight_offset"]),
        (lambda: TritonRMSNorm(8)(_x(2, 4)), ValueError, ["weight", "(4,)"]),
        (lambda: TritonRMSNorm(8, elementwise_affine=False)(_x(2, 4)), ValueError, ["normalized_shape", "(2, 4)"]),
        (lambda: TritonRMSNorm(8, elementwise_affine="yes"), TypeError, ["elementwise_affine"]),
        (lambda: TritonRMSNorm(), TypeError, ["normalized_shape"]),
        (lambda: TritonRMSNorm(8, hidden_size=8), TypeError, ["normalized_shape", "hidden_size"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), _x(2, 8), return_residual="no"), TypeError, ["return_residual", "str"]),
        (lambda: accel_torch.rmsnorm_residual_fused(_x(2, 8), _x(2, 8), return_residual=1), TypeError, ["return_residual"]),
        (lambda: accel_torch.rmsnorm_residual_torch(_x(2, 8), _x(2, 8), return_residual="no"), TypeError, ["return_residual"]),
        (lambda: accel_torch.rmsnorm(_x(2, 8), eps=torch.tensor(1e-6)), TypeError, ["eps"]),
    ],
)  # fmt: skip
def test_bad_input_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_errors_are_the_same_on_the_fallback(torch_fallback):
    with pytest.raises(ValueError, match="weight"):
        accel_torch.rmsnorm(_x(2, 8), _x(3))
    with pytest.raises(ValueError, match="casting"):
        accel_torch.rmsnorm_residual_fused(_x(2, 8), _x(2, 8), casting="nope")
