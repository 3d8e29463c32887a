"""replace_rmsnorm on Hugging Face models: every RMSNorm class of the installed transformers is
swapped with numerics that reproduce it, or left alone for a stated reason; tiny models of
each family give the same logits, bit for bit, before and after the swap (CPU, bf16: the
swapped modules run accel_torch's fallback math, the kernels' numerics in torch ops)."""

import copy
import glob
import importlib
import importlib.util
import inspect
import os
import re

import pytest
import torch
from torch import nn

from accel_torch.modules import TritonRMSNorm
from accel_torch.replace import PromotingRMSNorm, UnweightedRMSNorm, replace_rmsnorm
from tests.numerics.ulp import spacing

from .helpers import (
    assert_grad_close,
    assert_llama_matches_hf,
    assert_within_ulp,
    dx_scale,
    leaf64,
    llama_rmsnorm_hf,
    rmsnorm64,
)

transformers = pytest.importorskip("transformers")

_MODELS = os.path.join(os.path.dirname(transformers.__file__), "models")
_NORM_CLASS = re.compile(r"^class (\w*Norm\w*)\(", re.M)

# RMSNorm-named classes that replace_rmsnorm leaves alone, and why (their math is not an
# RMSNorm of x over the last axis times a weight). Names absent from the installed
# transformers are ignored; an RMSNorm class missing from here and not swapped fails.
_SIGMOID_GATE = "multiplies by sigmoid(gate), a second input"
_SILU_GATE = "multiplies by silu(gate), a second input"
_GROUPED = "normalizes groups of group_size channels, and multiplies by silu(gate)"
LEFT_ALONE = {
    "BailingHybridRMSNormGated": _SIGMOID_GATE,
    "Glm5NextTextRMSNormGated": _SIGMOID_GATE,
    "KimiLinearRMSNormGated": _SIGMOID_GATE,
    "LaraMiniRMSNormGated": _SILU_GATE,
    "OlmoHybridRMSNormGated": _SILU_GATE,
    "Qwen3_5RMSNormGated": _SILU_GATE,
    "Qwen3_5MoeRMSNormGated": _SILU_GATE,
    "Qwen3NextRMSNormGated": _SILU_GATE,
    "Qwen4ExpTextRMSNormGated": _SILU_GATE,
    "BambaRMSNormGated": _GROUPED,
    "GraniteMoeHybridRMSNormGated": _GROUPED,
    "MambaRMSNormGated": _GROUPED,
    "Mamba2RMSNormGated": _GROUPED,
    "NemotronHRMSNormGated": _GROUPED,
    "Zamba2RMSNormGated": _GROUPED,
    "FalconH1RMSNormGated": "normalizes n_groups groups, and multiplies by silu(gate)",
    "DeepseekV4UnweightedRMSNorm": "rounds rstd to x's dtype, then x * rstd in x's dtype",
    "Glm5NextTextUnweightedRMSNorm": "rounds rstd to x's dtype, then x * rstd in x's dtype",
    "HYV4UnweightedRMSNorm": "returns rstd itself, not x * rstd",
    "HYV4VLUnweightedRMSNorm": "returns rstd itself, not x * rstd",
    "MuseSparkTextCenteredRMSNorm": "rounds 1 + weight to the weight's dtype",
    "MuseSparkTextInputScaledRMSNorm": "scales x by 1 + weight and rounds, then normalizes",
    "PI05AdaptiveRMSNorm": "scales by 1 + scale and adds shift, both from a second input",
    "AXK2GatedRMSNorm": "a block (an RMSNorm, then a gate from an MLP): its RMSNorm is swapped",
}

# Constructor arguments for building one norm of each class (eps not a default, so that a
# swap that lost it shows); group_size only where it is required.
_ARGS = {"hidden_size": 64, "dim": 64, "normalized_shape": 64, "eps": 1e-5}
_REQUIRED_ARGS = {**_ARGS, "group_size": 16}


def _modeling_files():
    files = []
    for path in sorted(glob.glob(os.path.join(_MODELS, "*", "modeling_*.py"))):
        with open(path, encoding="utf-8") as f:
            if _NORM_CLASS.search(f.read()):
                files.append(os.path.relpath(path, _MODELS)[: -len(".py")].replace(os.sep, "."))
    return files


def _build(cls):
    """An instance from _ARGS and _REQUIRED_ARGS, or None."""
    kwargs = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in _ARGS or (p.default is p.empty and p.name in _REQUIRED_ARGS):
            kwargs[p.name] = _REQUIRED_ARGS[p.name]
        elif p.default is p.empty:
            return None
    try:
        return cls(**kwargs)
    except Exception:  # e.g. a LayerNorm2d wanting more than a size
        return None


def _assert_reproduces(original, swapped, dtype, casting, weight_dtype=None):
    """swapped(x) against original(x) on random inputs of dtype, the modules' weights in
    weight_dtype (default dtype): the same output dtype, and bit for bit, except for float64
    x (computed in float64: the float64 reference's values, within fp32 arithmetic of Hugging
    Face's) and for casting="fp32" with a weight: there accel_torch computes x * (rstd * w)
    and Hugging Face (x * rstd) * w, which round apart only next to a rounding midpoint
    (expected < 1 element in 1000 in 16-bit; a wrong casting differs in ~1/4 of them)."""
    torch.manual_seed(0)
    x = (3 * torch.randn(16, 64)).to(dtype)
    with torch.no_grad():
        original.to(weight_dtype or dtype)
        swapped.to(weight_dtype or dtype)
        expected, out = original(x), swapped(x)
    assert out.dtype == expected.dtype, (out.dtype, expected.dtype)
    assert weight_dtype is not None or out.dtype == dtype
    weight = getattr(swapped, "weight", None)
    if dtype == out.dtype == torch.float64:
        # float64 x: accel_torch computes in float64, Hugging Face's formulas in fp32.
        offset = getattr(swapped, "weight_offset", 0.0)
        torch.testing.assert_close(
            out, rmsnorm64(x, weight, swapped.eps, offset), rtol=1e-12, atol=0
        )
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
        return
    if casting == "llama" or weight is None:
        assert torch.equal(out, expected), f"{(out != expected).sum()} elements differ"
        return
    assert_within_ulp(out, rmsnorm64(x, weight, swapped.eps, swapped.weight_offset))
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=3e-7, atol=0)
    else:
        assert_within_ulp(out, expected.double())
        assert (out != expected).sum() <= 4


# (x's dtype, the weight's): mixed precision, e.g. fp32 weights under bf16 autocast, and
# float64 on either side.
_MIXED = [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
]


@pytest.mark.parametrize("modeling", _modeling_files())
def test_every_rmsnorm_class_is_swapped_or_left_alone_for_a_reason(modeling, torch_fallback):
    module = importlib.import_module(f"transformers.models.{modeling}")
    classes = [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, nn.Module)
        and c.__module__ == module.__name__
        and "Norm" in c.__name__
    ]
    for cls in classes:
        norm = _build(cls)
        if norm is None:
            assert "RMSNorm" not in cls.__name__ or cls.__name__ in LEFT_ALONE, cls
            continue
        if isinstance(getattr(norm, "weight", None), nn.Parameter):
            with torch.no_grad():
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape))
        holder = nn.Sequential(norm)
        result = replace_rmsnorm(holder)
        if cls.__name__ in LEFT_ALONE or not result:
            assert cls.__name__ in LEFT_ALONE or "RMSNorm" not in cls.__name__, (
                f"{cls.__name__} is neither swapped nor listed as left alone: {result.report()}"
            )
            assert result == 0 and holder[0] is norm, f"{cls.__name__} should be left alone"
            if "RMSNorm" in cls.__name__:
                assert [a.original for a in result.left_alone] == [cls.__name__]
            continue
        new = holder[0]
        assert result == 1 and isinstance(new, (TritonRMSNorm, UnweightedRMSNorm)), cls
        assert new.eps == _ARGS["eps"], cls
        casting = getattr(new, "casting", "fp32")
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            _assert_reproduces(norm, new, dtype, casting)
        for dtype, weight_dtype in _MIXED:
            _assert_reproduces(norm, new, dtype, casting, weight_dtype)


def _check_mixed_precision(rule, shape, device="cpu", exact=False, compiled=False):
    """An fp32 weight with bf16 x (autocast's mixed precision): y is fp32, as in Hugging Face,
    within the contract's bound of Hugging Face's formula (bit for bit where exact); dweight
    and dx within the backward's tolerance of float64's, given the xhat Hugging Face
    multiplies (rounded to bf16 for Llama; fp32 for T5) and the gradient reaching it (in
    that dtype). Hugging Face's own T5 dx is not held to that: it adds two bf16 gradients of
    x (the mean square's and the product's), which cancel."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    n = shape[-1]
    hf = (LlamaRMSNorm if rule == "llama" else T5LayerNorm)(n, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.copy_(0.5 + torch.rand(n))
    net = nn.Sequential(copy.deepcopy(hf))
    assert replace_rmsnorm(net) == 1 and net[0].rule == rule
    ours = torch.compile(net[0], fullgraph=True) if compiled else net[0]
    x = (3 * torch.randn(shape)).to(device, torch.bfloat16)
    dy = torch.randn(shape, device=device)
    w = hf.weight.detach()
    grads = {}
    for name, norm, weight in (("hf", hf, hf.weight), ("ours", ours, net[0].weight)):
        xs = x.clone().requires_grad_(True)
        y = norm(xs)
        grads[name] = (y, *torch.autograd.grad(y, (xs, weight), dy))
    (y_hf, dx_hf, dw_hf), (y, dx, dw) = grads["hf"], grads["ours"]
    assert y.dtype == y_hf.dtype == torch.float32 and dx.dtype == dx_hf.dtype == torch.bfloat16
    if exact:
        assert torch.equal(y, y_hf) and torch.equal(dw, dw_hf)
    x64 = leaf64(x)
    slack = None
    if rule == "llama":
        assert_llama_matches_hf(y, x, w, 1e-5, out_dtype=torch.float32)
        xhat, g = llama_rmsnorm_hf(x, torch.ones_like(w), 1e-5), (dy * w).to(torch.bfloat16)
        # Where the kernels' rstd rounds a near-tie x * rstd the other way (the contract's
        # bound, checked just above: y = w * xhat differs from HF's there, and only there),
        # their xhat is HF's bf16 neighbour: dweight's row sum differs by dy times that ulp.
        flipped = (y != y_hf).double()
        step = spacing(xhat.double(), torch.bfloat16)
        slack = (dy.double().abs() * step * flipped).reshape(-1, n).sum(0)
    else:
        assert_within_ulp(y, rmsnorm64(x, w, 1e-5))
        xhat, g = rmsnorm64(x, None, 1e-5), dy * w
    dw64 = (dy.double() * xhat.double()).reshape(-1, n).sum(0)
    assert_grad_close(dw, dw64, 1e-5, slack=slack)
    (dx64,) = torch.autograd.grad(rmsnorm64(x64, None, 1e-5), x64, g.double())
    assert_grad_close(dx, dx64, 1e-5, dx_scale(x, None, g, eps=1e-5))


@pytest.mark.parametrize("rule", ["llama", "t5"])
def test_mixed_precision_is_hugging_faces(rule, path):
    _check_mixed_precision(rule, (16, 64), exact=path == "fallback")


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 1000), (2, 5, 7168)], ids=str)
@pytest.mark.parametrize("rule", ["llama", "t5"])
def test_mixed_precision_is_hugging_faces_on_gpu(rule, shape, compiled):
    """The same on the compiled kernels, eager and under torch.compile (the op opaque to
    Inductor, so its bf16 xhat stays rounded as Hugging Face's eager one is)."""
    _check_mixed_precision(rule, shape, "cuda", compiled=compiled)


@pytest.mark.parametrize("residual_dtype", [None, torch.float32], ids=["h-bf16", "h-fp32"])
@pytest.mark.parametrize("rule", ["llama", "t5"])
def test_promoting_norm_with_a_residual_is_the_norm_of_the_sum(rule, residual_dtype, path):
    """forward(x, residual) in mixed precision: h = x + residual rounded once to
    residual_dtype (default x's), and y the Hugging Face formula of h, in its promoted
    dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    hf = (LlamaRMSNorm if rule == "llama" else T5LayerNorm)(32, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(0.5 + torch.rand(32))
    norm = PromotingRMSNorm(32, 1e-5, rule)
    norm.weight, norm.residual_dtype = hf.weight, residual_dtype
    x, r = (torch.randn(8, 32).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        y, h = norm(x, r)
        expected_h = (x.float() + r.float()).to(residual_dtype or x.dtype)
        expected = hf(expected_h)
    assert torch.equal(h, expected_h) and y.dtype == expected.dtype == torch.float32
    if rule == "llama":
        assert_llama_matches_hf(y, h, hf.weight, 1e-5, out_dtype=torch.float32)
    else:
        assert_within_ulp(y, rmsnorm64(h, hf.weight, 1e-5))
    with pytest.raises(ValueError, match="rule"):
        PromotingRMSNorm(32, 1e-5, "gemma")


def test_instance_attributes_decide_if_tests(torch_fallback):
    """Qwen4ExpTextRMSNorm is Gemma's formula without group_size, a grouped norm with it."""
    modeling = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")
    gemma3n = pytest.importorskip("transformers.models.gemma3n.modeling_gemma3n")
    plain = modeling.Qwen4ExpTextRMSNorm(64, eps=1e-5)
    grouped = modeling.Qwen4ExpTextRMSNorm(64, group_size=16, eps=1e-5)
    unscaled = gemma3n.Gemma3nRMSNorm(64, eps=1e-5, with_scale=False)
    model = nn.ModuleDict({"plain": plain, "grouped": grouped, "unscaled": unscaled})
    result = replace_rmsnorm(model)
    assert result == 2 and model["grouped"] is grouped
    assert model["plain"].weight_offset == 1.0 and model["plain"].weight is plain.weight
    assert isinstance(model["unscaled"], UnweightedRMSNorm)
    assert [(a.path, a.original) for a in result.left_alone] == [("grouped", "Qwen4ExpTextRMSNorm")]
    for dtype in (torch.bfloat16, torch.float32):
        _assert_reproduces(unscaled, model["unscaled"], dtype, "fp32")


# ---- whole models: a tiny config of each family, logits bit for bit ----

_TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_T5 = dict(vocab_size=64, d_model=64, d_kv=32, d_ff=64, num_layers=1, num_heads=2)
_T5_SUB = {k: v for k, v in _TINY.items() if k not in ("bos_token_id", "eos_token_id")}
_T5_SUB.update(query_pre_attn_scalar=32, sliding_window=16)

# (model_type, config overrides, norm weights, casting and weight_offset of the weighted norms
# swapped in, classes left alone). Norm weights: "any" random; "pow2" random powers of two as
# the scale (the weight, or 1 + weight): with those, fp32 casting's x * (rstd * w) and the
# fp32 families' (x * rstd) * w are both exact products, so their logits must agree bit for
# bit too (the module test above bounds the general case).
FAMILIES = [
    ("llama", {}, "any", ("llama", 0.0), ()),
    ("mistral", {}, "any", ("llama", 0.0), ()),
    ("qwen3", {}, "any", ("llama", 0.0), ()),
    ("granite", {}, "any", ("llama", 0.0), ()),
    ("glm4", {}, "any", ("llama", 0.0), ()),
    (
        "deepseek_v3",
        dict(
            head_dim=16,
            num_key_value_heads=2,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
        ),
        "any",
        ("llama", 0.0),
        (),
    ),
    ("llama4_text", dict(num_local_experts=2, intermediate_size_mlp=64), "any", ("llama", 0.0), ()),
    ("t5", _T5, "any", ("llama", 0.0), ()),
    ("olmo2", {}, "pow2", ("fp32", 0.0), ()),
    ("helium", {}, "pow2", ("fp32", 0.0), ()),
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2), "pow2", ("fp32", 0.0), ()),
    (
        "gemma3n_text",
        dict(
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=64,
            laurel_rank=4,
            num_kv_shared_layers=0,
            layer_types=["full_attention"],
            activation_sparsity_pattern=[0.0],
        ),
        "pow2",
        ("fp32", 0.0),
        (),
    ),
    ("gemma", {}, "pow2", ("fp32", 1.0), ()),
    ("gemma2", {}, "pow2", ("fp32", 1.0), ()),
    ("vaultgemma", {}, "pow2", ("fp32", 1.0), ()),
    (
        "qwen3_next",
        dict(
            layer_types=["linear_attention", "full_attention"],
            num_hidden_layers=2,
            linear_num_value_heads=2,
            linear_num_key_heads=1,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        "pow2",
        ("fp32", 1.0),
        ("Qwen3NextRMSNormGated",),
    ),
    ("t5gemma", dict(encoder=_T5_SUB, decoder=_T5_SUB, vocab_size=64), "pow2", ("fp32", 1.0), ()),
    ("nanochat", {}, "any", None, ()),
]


def _set_norm_weights(model, kind, generator):
    """Random weights for every 1-d weight of a *Norm* module (as "any" or "pow2" says)."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if "Norm" not in type(module).__name__ or not isinstance(w, nn.Parameter) or w.dim() != 1:
            continue
        if kind == "any":
            values = 0.5 + torch.rand(w.shape, generator=generator)
        else:
            scale = 2.0 ** torch.randint(-1, 3, w.shape, generator=generator)
            offset = 1.0 if torch.all(w == 0) else 0.0  # Gemma-style norms start at zero
            values = scale - offset
        with torch.no_grad():
            w.copy_(values)


def _logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


def _tiny_model(model_type, overrides):
    """A tiny model of the family (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base = _T5 if model_type == "t5" else {} if model_type == "t5gemma" else _TINY
    config = AutoConfig.for_model(model_type, **{**base, **overrides})
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(config).eval()


@pytest.mark.parametrize(
    "model_type, weights",
    [("llama", "any"), ("qwen3", "any"), ("t5", "any"), ("olmo2", "pow2"), ("gemma", "pow2")],
)
def test_tiny_model_logits_bit_exact_after_swap_under_autocast(model_type, weights, torch_fallback):
    """fp32 parameters under bf16 autocast (mixed-precision training's forward): the norms
    see bf16 activations (Qwen 3's q/k norms: the projections' outputs) with fp32 weights,
    and the logits stay the same bit for bit through the swap. Norm weights as in FAMILIES:
    any for the Llama-style families (whose fp32 outputs a swap to x's dtype would round),
    powers of two for the fp32-style ones."""
    model = _tiny_model(model_type, {})
    _set_norm_weights(model, weights, torch.Generator().manual_seed(1))
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = _logits(model, ids)
        assert replace_rmsnorm(model) > 0
        after = _logits(model, ids)
    assert before.dtype == torch.bfloat16 and before.abs().max() > 0
    assert torch.equal(after, before), f"{(after != before).sum()} of {after.numel()} differ"


@pytest.mark.parametrize(
    "model_type, overrides, weights, numerics, left_alone",
    FAMILIES,
    ids=[f[0] for f in FAMILIES],
)
def test_tiny_model_logits_bit_exact_after_swap(
    model_type, overrides, weights, numerics, left_alone, torch_fallback
):
    model = _tiny_model(model_type, overrides).to(torch.bfloat16)
    _set_norm_weights(model, weights, torch.Generator().manual_seed(1))
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    norms = {
        name: type(m).__name__
        for name, m in model.named_modules()
        if re.search("RMSNorm|T5LayerNorm|L2Norm", type(m).__name__)
    }
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    before = _logits(model, ids)

    result = replace_rmsnorm(model)

    after = _logits(model, ids)
    assert torch.equal(after, before), f"{(after != before).sum()} of {after.numel()} differ"
    assert before.abs().max() > 0
    swapped = {s.path: s.original for s in result.swapped}
    assert result == len(swapped) > 0
    assert {a.path: a.original for a in result.left_alone} == {
        p: c for p, c in norms.items() if c in left_alone
    }
    assert swapped == {p: c for p, c in norms.items() if c not in left_alone}
    for path in swapped:
        new = model.get_submodule(path)
        if f"{path}.weight" not in params:
            assert isinstance(new, UnweightedRMSNorm), path
        else:
            assert (new.casting, new.weight_offset) == numerics, path
            assert new.weight is params[f"{path}.weight"]  # the same Parameter, not a copy
    assert list(model.state_dict()) == keys
    assert replace_rmsnorm(model) == 0


# ---- the summary ----


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

        self.a = LlamaRMSNorm(32)
        self.b = nn.Sequential(nn.Linear(32, 32), LlamaRMSNorm(32, eps=1e-5))
        self.shared = self.a  # one module at two paths: one replacement at both
        self.gated = Qwen3NextRMSNormGated(32)
        self.torch_norm = nn.RMSNorm(32, eps=1e-5)
        self.torch_2d = nn.RMSNorm([4, 8])
        self.ln = nn.LayerNorm(32)


def test_summary_is_the_count_and_says_what_was_done(capsys):
    net = _Net()
    result = replace_rmsnorm(net, verbose=True)
    assert result == 3 and isinstance(result, int) and result + 1 == 4 and f"{result}" == "3"
    assert net.shared is net.a and isinstance(net.a, TritonRMSNorm)
    assert isinstance(net.ln, nn.LayerNorm) and isinstance(net.gated, nn.Module)
    assert [s.path for s in result.swapped] == ["a", "b.1", "torch_norm"]
    assert {a.path: a.original for a in result.left_alone} == {
        "gated": "Qwen3NextRMSNormGated",
        "torch_2d": "RMSNorm",
    }
    assert net.torch_norm.casting == "fp32" and net.b[1].casting == "llama"
    printed = capsys.readouterr().out
    assert printed.strip() == result.report()
    assert "swapped 3 modules" in printed and "2 x LlamaRMSNorm" in printed
    assert "Qwen3NextRMSNormGated" in printed and "last 2 dimensions" in printed
    copied = copy.deepcopy(result)
    assert copied == 3 and copied.swapped == result.swapped
    assert replace_rmsnorm(net) == 0


def test_the_model_itself_is_reported_not_swapped():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8)
    result = replace_rmsnorm(norm)
    assert result == 0 and [a.reason.split(" (")[0] for a in result.left_alone] == [
        "the model itself"
    ]


def test_patched_or_hooked_instances_are_left_alone():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hooked, patched = LlamaRMSNorm(16), LlamaRMSNorm(16)
    hooked.register_forward_hook(lambda m, i, o: o)
    patched.forward = lambda x: x
    net = nn.ModuleDict({"hooked": hooked, "patched": patched})
    result = replace_rmsnorm(net)
    assert result == 0 and net["hooked"] is hooked and net["patched"] is patched
    assert {a.reason for a in result.left_alone} == {
        "its forward is patched or hooked on this instance"
    }


# A torch whose rsqrt is sqrt: code reading it is not the formula its text spells.
_OTHER_TORCH = """import torch as _torch


class _Torch:
    rsqrt = staticmethod(_torch.sqrt)

    def __getattr__(self, name):
        return getattr(_torch, name)


torch = _Torch()"""


def _llama_norm_spelled(attr, folder, torch_import="import torch"):
    """LlamaRMSNorm's class with its eps attribute renamed to attr: the installed source,
    rewritten and loaded from a file in folder (replace_rmsnorm reads a class's source),
    whose module gets torch from torch_import."""
    from transformers.models.llama import modeling_llama

    source = inspect.getsource(modeling_llama.LlamaRMSNorm).replace("variance_epsilon", attr)
    which = "torch" if torch_import == "import torch" else "other_torch"
    path = folder / f"llama_norm_{attr}_{which}.py"
    hub = "use_kernel_forward_from_hub = lambda name: lambda c: c"  # the class's decorator
    path.write_text(f"{torch_import}\nfrom torch import nn\n\n{hub}\n\n\n{source}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LlamaRMSNorm


class _BlockRMSNorm(nn.Module):
    """An RMSNorm-named block: a projection, then a Llama RMSNorm."""

    def __init__(self, n):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        super().__init__()
        self.proj = nn.Linear(n, n)
        self.norm = LlamaRMSNorm(n)

    def forward(self, x):
        return self.norm(self.proj(x))


def test_eps_under_either_hugging_face_name_is_the_same_formula(tmp_path, torch_fallback):
    """Hugging Face spells a norm's eps self.eps or self.variance_epsilon: both are the Llama
    formula, swapped with that attribute's value; another name is no known formula."""
    torch.manual_seed(0)
    norms = {
        attr: _llama_norm_spelled(attr, tmp_path)(64, eps)
        for attr, eps in (("eps", 3e-5), ("variance_epsilon", 2e-3), ("epsilon", 1e-5))
    }
    net = nn.ModuleDict(norms).to(torch.bfloat16)
    _set_norm_weights(net, "any", torch.Generator().manual_seed(0))
    result = replace_rmsnorm(net)
    assert [s.path for s in result.swapped] == ["eps", "variance_epsilon"]
    assert net["eps"].eps == 3e-5 and net["variance_epsilon"].eps == 2e-3
    assert net["epsilon"] is norms["epsilon"]
    assert [(a.path, a.reason) for a in result.left_alone] == [
        ("epsilon", "its forward is not one of the RMSNorm formulas accel_torch reproduces")
    ]
    for attr in ("eps", "variance_epsilon"):
        assert net[attr].casting == "llama"
        _assert_reproduces(norms[attr], net[attr], torch.bfloat16, "llama")


def test_a_formula_reading_another_torch_is_left_alone(tmp_path):
    """The Llama formula's text in a module whose name torch is not torch (here its rsqrt is
    sqrt): the text is the formula, its arithmetic is not."""
    norm = _llama_norm_spelled("variance_epsilon", tmp_path, _OTHER_TORCH)(16)
    x = torch.randn(4, 16)
    assert not torch.allclose(norm(x), rmsnorm64(x, norm.weight, 1e-6).float())
    net = nn.Sequential(norm)
    result = replace_rmsnorm(net)
    assert result == 0 and net[0] is norm
    assert [a.reason for a in result.left_alone] == [
        "its forward is not one of the RMSNorm formulas accel_torch reproduces"
    ]
    plain = nn.Sequential(_llama_norm_spelled("variance_epsilon", tmp_path)(16))
    assert replace_rmsnorm(plain) == 1  # the same file with torch itself is swapped


def test_an_rmsnorm_named_block_is_reported_and_searched():
    block = _BlockRMSNorm(16)
    net = nn.Sequential(block)
    result = replace_rmsnorm(net)
    assert net[0] is block and isinstance(block.norm, TritonRMSNorm)
    assert [s.path for s in result.swapped] == ["0.norm"]
    assert [(a.path, a.original) for a in result.left_alone] == [("0", "_BlockRMSNorm")]
    assert "a block, not a norm" in result.left_alone[0].reason


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), -1.0, None])
def test_norms_with_an_unusable_eps_are_left_alone(eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    net = nn.Sequential(LlamaRMSNorm(16, eps=eps))
    result = replace_rmsnorm(net)
    assert result == 0 and isinstance(net[0], LlamaRMSNorm)
    assert "is not a finite number >= 0" in result.left_alone[0].reason


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_torch_rmsnorm_swapped_with_its_eps(eps, torch_fallback):
    """nn.RMSNorm's eps=None is, in torch's arithmetic, finfo(float32).eps also for bf16
    inputs (not finfo(bf16).eps = 0.0078). Power-of-two weights: torch's (x * rstd) * w and
    fp32 casting's x * (rstd * w) agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.RMSNorm(64, eps=eps)).to(torch.bfloat16)
    with torch.no_grad():
        model[1].weight.copy_(2.0 ** torch.randint(-1, 3, (64,)))
    x = torch.randn(8, 64, dtype=torch.bfloat16) * 0.05  # small: eps matters
    with torch.no_grad():
        before = model(x)
        assert replace_rmsnorm(model) == 1
        assert model[1].eps == (torch.finfo(torch.float32).eps if eps is None else eps)
        assert torch.equal(model(x), before)
