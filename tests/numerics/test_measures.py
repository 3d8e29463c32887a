"""The suite's own instruments: ulp measures, the float64 reference, the llama bound.

A wrong instrument would pass wrong kernels, so each is checked against an independent
fact (nextafter, Hugging Face's module, the closed-form gradient). No kernels run here.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import ulp
from .cases import CPU_CASES, REAL_CASES, STRIDE_PAD, Case, by_name, make_inputs
from .reference import llama_expected, llama_interval, llama_steps, reference
from .runner import grad_check

LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float32, *LOW]


@pytest.mark.parametrize("dtype", ALL)
def test_spacing_is_the_step_to_the_next_value(dtype):
    fi = torch.finfo(dtype)
    vals = torch.tensor([1.0, 1.5, 3.0, 1000.0, fi.tiny, fi.tiny * 0.25, fi.max / 2], dtype=dtype)
    nxt = torch.nextafter(vals.float(), torch.tensor(math.inf)).to(dtype)
    # nextafter in fp32, rounded up to dtype, may land on vals itself for 16-bit: step by bits
    bits = vals.view(torch.int16 if dtype != torch.float32 else torch.int32) + 1
    nxt = bits.view(dtype)
    assert torch.equal(ulp.spacing(vals.double(), dtype), nxt.double() - vals.double())
    assert (
        float(ulp.spacing(torch.zeros(1, dtype=torch.float64), dtype))
        == fi.smallest_normal * fi.eps
    )


@pytest.mark.parametrize("dtype", ALL)
def test_ordinal_distance(dtype):
    view = torch.int16 if dtype != torch.float32 else torch.int32
    a = torch.tensor([1.0, -1.0, 0.0, 0.0, math.nan, math.nan, 2.0], dtype=dtype)
    b = a.view(view).clone()
    b[0] += 1  # one step up
    b[1] += 3  # three steps away from zero
    b = b.view(dtype).clone()
    b[3] = -0.0  # +0 and -0 are one point
    b[4] = math.nan
    b[5] = 1.0
    d = ulp.ordinal_distance(a, b)
    assert d.tolist() == [1.0, 3.0, 0.0, 0.0, 0.0, math.inf, 0.0]
    smallest = torch.tensor([torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps])
    pair = torch.cat([smallest, -smallest]).to(dtype)
    assert ulp.ordinal_distance(pair[:1], pair[1:]).item() == 2.0  # across zero


def test_ulp_and_rel_error_nan_inf_and_saturation():
    ref = torch.tensor([1.0, math.nan, 1.0, 70000.0, 0.0], dtype=torch.float64)
    out = torch.tensor([1.0078125, math.nan, math.nan, math.inf, 0.0])
    e = ulp.ulp_error(out.to(torch.float16), ref, torch.float16)
    assert e[1] == 0 and e[2] == math.inf and e[3] == 0 and e[4] == 0  # 70000 rounds to inf
    assert e[0] == 8.0  # fp16 spacing at 1 is 2**-10
    r = ulp.rel_error(
        torch.tensor([1.0 + 2e-5, 1e-45]), torch.tensor([1.0, 0.0]).double(), torch.float32
    )
    assert r[0] == pytest.approx(
        2e-5, rel=1e-2
    )  # 1 + 2e-5 rounded to fp32 and r[1] == 0  # 1 ulp at zero accepted


def test_row_error_and_interval_distance():
    ref = torch.tensor([[1.0, 0.5], [2.0, math.nan]], dtype=torch.float64)
    out = torch.tensor([[1.0, 0.5 + 2**-8], [2.0, math.nan]])
    e = ulp.row_error(out, ref, ref, torch.bfloat16)
    assert e.tolist() == [0.5, 0.0]
    lo = torch.tensor([1.0, 2.0, math.nan], dtype=torch.bfloat16)
    hi = torch.tensor([1.015625, 2.0, math.nan], dtype=torch.bfloat16)
    y = torch.tensor([1.0078125, 2.015625, 0.0], dtype=torch.bfloat16)
    assert ulp.interval_distance(y, lo, hi).tolist() == [0.0, 1.0, math.inf]


@pytest.mark.parametrize("dtype", LOW)
def test_llama_steps_are_hugging_face(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(64, 384) * 3).to(dtype)
    w = (torch.randn(384) * 0.5 + 1).to(dtype)
    mod = LlamaRMSNorm(384, eps=1e-6).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
        hf = mod(x)
    assert torch.equal(llama_steps(x, w, 1e-6, 0.0, dtype).view(torch.int16), hf.view(torch.int16))


@pytest.mark.parametrize(
    "name",
    ["bf16_llama", "fp16_llama", "fp16_fused_h_llama", "bf16_gemma_llama"],
)
def test_llama_interval_holds_hf_and_rejects_fp32_casting(name):
    case = by_name(CPU_CASES)[name]
    inp = make_inputs(case, "cpu")
    lo, hi = llama_interval(case, inp)
    hf = llama_expected(case, inp)
    assert ulp.max_or_zero(ulp.interval_distance(hf, lo, hi)) == 0
    assert ulp.max_or_zero(ulp.ordinal_distance(lo, hi)) <= 2
    # The "fp32" casting (one rounding) is a different op: the interval must tell them apart.
    ref = reference(case, inp)
    one_rounding = ref.y.float().to(case.x_dtype)
    assert ulp.max_or_zero(ulp.interval_distance(one_rounding, lo, hi)) >= 1


def test_reference_gradients_are_the_contract_formula():
    case = Case("t", (6, 40), dtype="float32", fused=True, return_residual=True, weight_offset=1.0)
    inp = make_inputs(case, "cpu")
    ref = reference(case, inp)
    h = (inp.x.double() + inp.residual.double()).float().double()
    rstd = 1 / torch.sqrt((h * h).mean(-1, keepdim=True) + case.eps)
    xhat = h * rstd
    g = inp.dy.double() * (inp.weight.double() + 1.0)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True)) + inp.dh.double()
    torch.testing.assert_close(ref.dx, dx, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.dresidual, dx, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.dweight, (inp.dy.double() * xhat).sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.y, xhat * (inp.weight.double() + 1.0), rtol=1e-12, atol=0)


def test_overflow_row_reference_is_pytorch_zeros():
    case = by_name(CPU_CASES)["fp32_overflow_row"]
    inp = make_inputs(case, "cpu")
    ref = reference(case, inp)
    assert int(ref.overflow_rows.sum()) == 1
    assert torch.all(ref.y.reshape(-1, case.n)[ref.overflow_rows] == 0)


def test_grad_bound_catches_a_wrong_gradient():
    """A gradient off by one bf16 step at the row's largest element breaches the bound."""
    ref = torch.tensor([[1.0, -0.25, 0.125]], dtype=torch.float64)
    good = ref.to(torch.bfloat16)
    bad = good.clone()
    bad[0, 0] = 1.0 + 2 * 2**-7
    assert grad_check(good, ref, ref, torch.bfloat16).ok
    assert not grad_check(bad, ref, ref, torch.bfloat16).ok


def test_case_table():
    by_name(CPU_CASES)
    by_name(REAL_CASES)
    for c in CPU_CASES:
        assert c.rows <= 64 and (c.n <= 1100 or c.rows <= 3), c.name  # interpreted budget
        assert not (c.weight is None and c.weight_offset), c.name


def test_inputs_deterministic_and_strided_in_place():
    case = by_name(CPU_CASES)["bf16_strided"]
    a, b = make_inputs(case, "cpu"), make_inputs(case, "cpu")
    assert torch.equal(a.x.view(torch.int16), b.x.view(torch.int16))
    assert a.x.stride() == (case.n + STRIDE_PAD, 1) and not a.x.is_contiguous()
    assert a.x.data_ptr() == a.x_buffer.data_ptr()
