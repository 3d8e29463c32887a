"""TritonRMSNorm as a drop-in for torch.nn.RMSNorm and Hugging Face RMSNorms; replace_rmsnorm."""

import inspect

import pytest
import torch
from torch import nn

from accel_torch import TritonRMSNorm, replace_rmsnorm

from .helpers import assert_llama_matches_hf, assert_within_ulp, rmsnorm64

transformers = pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
    return module


def test_constructor_is_torch_rmsnorms():
    """Every parameter of nn.RMSNorm, in its order, with its default (normalized_shape's
    is None, as hidden_size= may name it instead); the rest keyword-only."""
    theirs = list(inspect.signature(nn.RMSNorm.__init__).parameters.values())
    ours = list(inspect.signature(TritonRMSNorm.__init__).parameters.values())
    assert [(p.name, p.kind) for p in ours[: len(theirs)]] == [(p.name, p.kind) for p in theirs]
    defaults = [p.default for p in theirs if p.name != "normalized_shape"]
    assert [p.default for p in ours[: len(theirs)] if p.name != "normalized_shape"] == defaults
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_eps_is_the_inputs_machine_epsilon_as_in_torch(dtype):
    """eps=None: the machine epsilon torch.nn.RMSNorm uses, that of the dtype it computes
    in (fp32 for bf16), chosen per call. Inputs near 1e-4 make it visible."""
    ref = _randomize(nn.RMSNorm(64)).to(dtype)
    mine = TritonRMSNorm(64, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    x = (1e-4 * torch.randn(5, 64)).to(dtype)
    eps = torch.finfo(torch.float32).eps
    assert_within_ulp(mine(x), rmsnorm64(x, ref.weight, eps))
    with torch.no_grad():
        assert_within_ulp(mine(x), ref(x).double())
    x64 = 1e-7 * torch.randn(3, 64, dtype=torch.float64)  # float64: float64's epsilon
    want = rmsnorm64(x64, mine.weight, torch.finfo(torch.float64).eps)
    torch.testing.assert_close(mine(x64), want, rtol=1e-14, atol=0)


def test_constructor_spellings():
    positional = TritonRMSNorm(16, 1e-5, False, "cpu", torch.bfloat16)
    assert positional.weight is None and positional.eps == 1e-5
    keywords = TritonRMSNorm(
        normalized_shape=(16,), eps=None, elementwise_affine=True, device="cpu", dtype=torch.float16
    )
    assert keywords.weight.dtype == torch.float16 and keywords.normalized_shape == (16,)
    assert keywords.eps is None
    old = TritonRMSNorm(hidden_size=4096, eps=1e-6)
    assert old.hidden_size == 4096 and old.eps == 1e-6 and old.weight.shape == (4096,)
    ref = nn.RMSNorm([16])
    assert list(TritonRMSNorm([16]).state_dict()) == list(ref.state_dict()) == ["weight"]
    assert list(LlamaRMSNorm(16).state_dict()) == ["weight"]
    assert repr(TritonRMSNorm(16)).startswith("TritonRMSNorm((16,), eps=None")


def test_loads_torch_rmsnorm_state_dict_and_matches():
    ref = _randomize(nn.RMSNorm(64, eps=1e-5))
    mine = TritonRMSNorm(64, eps=1e-5)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 64)
    assert_within_ulp(mine(x), rmsnorm64(x, ref.weight, 1e-5))
    torch.testing.assert_close(mine(x), ref(x), rtol=2e-6, atol=1e-6)
    assert list(mine.state_dict()) == ["weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm])
def test_llama_casting_within_one_ulp_of_hugging_face(cls, dtype):
    hf = _randomize(cls(96, eps=1e-6)).to(dtype)
    mine = TritonRMSNorm(96, eps=1e-6, casting="llama", dtype=dtype)
    mine.load_state_dict(hf.state_dict())
    x = (4 * torch.randn(7, 96)).to(dtype)
    with torch.no_grad():
        expected = hf(x)
    assert expected.dtype == dtype
    with torch.no_grad():
        assert_llama_matches_hf(mine(x), x, hf.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemma_offset_matches_hugging_face_gemma(dtype):
    hf = GemmaRMSNorm(80, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_(0, 0.2)
    mine = TritonRMSNorm(80, eps=1e-6, weight_offset=1.0)
    mine.load_state_dict(hf.state_dict())
    x = torch.randn(6, 80).to(dtype)
    assert_within_ulp(mine(x), rmsnorm64(x, hf.weight, 1e-6, weight_offset=1.0))
    with torch.no_grad():
        assert_within_ulp(mine(x), hf(x).double())
    fresh = TritonRMSNorm(80, weight_offset=1.0)
    assert torch.equal(fresh.weight, torch.zeros(80))  # like Gemma: scale 1 + 0


def test_forward_with_residual_returns_y_and_h():
    norm = _randomize(TritonRMSNorm(32))
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    y, h = norm(x, r)
    assert torch.equal(h, x + r)
    assert_within_ulp(y, rmsnorm64(h, norm.weight))


def test_no_affine():
    norm = TritonRMSNorm(16, elementwise_affine=False)
    assert norm.weight is None and len(list(norm.parameters())) == 0
    x = torch.randn(3, 16)
    assert_within_ulp(norm(x), rmsnorm64(x))


def test_module_gradients_reach_weight():
    norm = _randomize(TritonRMSNorm(48))
    x = torch.randn(5, 48, requires_grad=True)
    norm(x).square().sum().backward()
    assert norm.weight.grad is not None and x.grad is not None
    ref = _randomize(nn.RMSNorm(48, eps=1e-6))
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    def __init__(self, norm_a, norm_b):
        super().__init__()
        self.input_layernorm = norm_a
        self.proj = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 32), norm_b)
        self.ln = nn.LayerNorm(32)

    def forward(self, x):
        return self.ln(self.mlp(self.proj(self.input_layernorm(x))))


@pytest.mark.parametrize(
    "make, casting, offset",
    [
        (lambda: nn.RMSNorm(32, eps=1e-5), "fp32", 0.0),
        (lambda: nn.RMSNorm(32), "fp32", 0.0),
        (lambda: LlamaRMSNorm(32, eps=1e-5), "llama", 0.0),
        (lambda: Qwen2RMSNorm(32, eps=1e-5), "llama", 0.0),
        (lambda: GemmaRMSNorm(32, eps=1e-5), "fp32", 1.0),
    ],
)
def test_replace_rmsnorm_swaps_known_modules_with_same_numerics(make, casting, offset):
    torch.manual_seed(0)
    model = _Block(_randomize(make(), 1), _randomize(make(), 2)).to(torch.bfloat16)
    original = model.input_layernorm
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        original_y = original(x)
    assert replace_rmsnorm(model) == 2
    assert isinstance(model.input_layernorm, TritonRMSNorm)
    assert isinstance(model.mlp[1], TritonRMSNorm)
    assert isinstance(model.ln, nn.LayerNorm)  # unknown modules are left alone
    assert model.input_layernorm.casting == casting
    assert model.input_layernorm.weight_offset == offset
    with torch.no_grad():
        after = model(x)
        assert_within_ulp(model.input_layernorm(x), original_y.double())
    # The whole model: the same up to the norms' last-bit differences through the linears.
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)
    assert replace_rmsnorm(model) == 0


def test_replace_keeps_eps_and_weights():
    model = nn.Sequential(_randomize(LlamaRMSNorm(24, eps=3e-5)))
    w = model[0].weight.detach().clone()
    replace_rmsnorm(model)
    assert model[0].eps == 3e-5 and torch.equal(model[0].weight, w)
    torch_default = nn.Sequential(nn.RMSNorm(8))  # eps=None: torch uses finfo(float32).eps
    replace_rmsnorm(torch_default)
    assert torch_default[0].eps == torch.finfo(torch.float32).eps
