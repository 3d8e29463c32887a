"""replace_rmsnorm: swap a model's RMSNorm modules for accel_torch's, with the same numerics.

A module is swapped when its class is ``torch.nn.RMSNorm`` or when its ``forward`` (with the
methods it calls on ``self``) is, statement for statement, one of the RMSNorm formulas in
``_FORMULAS`` below: the spellings found across Hugging Face transformers (Llama's, OLMo 2's,
Gemma's, T5's, ...), whatever the class is called. The comparison is on the parsed code with
local names, docstrings, comments and annotations set aside, with ``if`` tests on plain
attributes (``self.with_scale``, ``self.group_size is not None``) decided by the instance, and
with eps read from either attribute name Hugging Face uses (``self.eps``,
``self.variance_epsilon``).
Anything else (gated norms, grouped norms, other roundings) is left alone and reported.
"""

import ast
import copy
import functools
import inspect
import math
import textwrap
from typing import NamedTuple

import torch
from torch import nn

from .modules import TritonRMSNorm
from .ops import rmsnorm, rmsnorm_residual_fused
from .validation import check_eps


class _Formula(NamedTuple):
    """How accel_torch reproduces one RMSNorm formula."""

    name: str
    casting: str
    weight_offset: float
    weighted: bool
    eps_attr: str = "eps"  # the attribute holding eps; set per spelling by _known_formulas
    dtypes: str = "x"  # the output dtype: "x" (x's), or a PromotingRMSNorm rule


# Each formula's code, as Hugging Face writes it (the first of several identical copies), with
# eps spelled ``self.eps``: a copy spelling it ``self.variance_epsilon`` is the same formula.
# Llama-style ("llama" casting): round(x * rstd) to x's dtype, then times the weight, HF's
# output bit for bit. Its dtype is x's and the weight's promoted (fp32 for an fp32 weight
# and bf16 activations, as under autocast): PromotingRMSNorm keeps that dtype rule.
# fp32 style: (x * rstd) * w in fp32, one rounding. accel_torch's "fp32" casting computes
# x * (rstd * w): within 1 ulp of it, bit-equal when the scale is a power of two.
_LLAMA = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
    return self.weight * hidden_states.to(input_dtype)
"""
_T5 = """
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
"""
_OLMO2 = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
    return (self.weight * hidden_states).to(input_dtype)
"""
_HELIUM = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
    return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)
"""
_NORM = """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
"""
_GEMMA = (
    _NORM
    + """
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
"""
)
_QWEN4_UNGROUPED = """
def _norm(self, x):
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return out

def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
"""
_MOSHI = (
    _NORM
    + """
def forward(self, x):
    output = self._norm(x.float())
    output = output * self.weight.float()
    return output.type_as(x)
"""
)
_LLAMA4 = (
    _NORM
    + """
def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight
"""
)
_UNWEIGHTED = (
    _NORM
    + """
def forward(self, x):
    return self._norm(x.float()).type_as(x)
"""
)
_POW_NORM = """
def _norm(self, hidden_states):
    mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
    return hidden_states * torch.pow(mean_squared, -0.5)
"""
_GEMMA3N = (
    _POW_NORM
    + """
def forward(self, hidden_states):
    normed_output = self._norm(hidden_states.float())
    normed_output = normed_output * self.weight.float()
    return normed_output.type_as(hidden_states)
"""
)
_GEMMA3N_UNWEIGHTED = (
    _POW_NORM
    + """
def forward(self, hidden_states):
    normed_output = self._norm(hidden_states.float())
    return normed_output.type_as(hidden_states)
"""
)
_INKLING2_UNWEIGHTED = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.float()
    hidden_states = hidden_states * torch.rsqrt(
        hidden_states.square().mean(-1, keepdim=True) + self.eps
    )
    return hidden_states.to(input_dtype)
"""

_ERGO = """
def forward(self, hidden_states):
    output = F.rms_norm(hidden_states.float(), self.weight.shape, self.weight.float(), self.eps)
    return output.to(hidden_states.dtype)
"""

_FORMULAS = {
    _LLAMA: _Formula("Llama", "llama", 0.0, True, dtypes="llama"),
    _T5: _Formula("T5", "llama", 0.0, True, dtypes="t5"),
    _LLAMA4: _Formula("Llama 4", "llama", 0.0, True, dtypes="llama"),
    _OLMO2: _Formula("OLMo 2", "fp32", 0.0, True),
    _HELIUM: _Formula("Helium", "fp32", 0.0, True),
    _MOSHI: _Formula("Moshi", "fp32", 0.0, True),
    _GEMMA3N: _Formula("Gemma 3n", "fp32", 0.0, True),
    _GEMMA: _Formula("Gemma", "fp32", 1.0, True),
    _QWEN4_UNGROUPED: _Formula("Gemma", "fp32", 1.0, True),
    _UNWEIGHTED: _Formula("NanoChat", "fp32", 0.0, False),
    _GEMMA3N_UNWEIGHTED: _Formula("Gemma 3n", "fp32", 0.0, False),
    _INKLING2_UNWEIGHTED: _Formula("Inkling 2", "fp32", 0.0, False),
    _ERGO: _Formula("Ergo", "fp32", 0.0, True),
}
_EPS_ATTRS = ("eps", "variance_epsilon")

_NOT_A_FORMULA = "its forward is not one of the RMSNorm formulas accel_torch reproduces"
_A_BLOCK = "it holds submodules (a block, not a norm): the norms inside it are searched instead"


# ---- canonical form of a forward: parsed code, names and annotations set aside ----


class _Canonicalize(ast.NodeTransformer):
    """Drop docstrings, annotations and decorators; decide ``if`` tests on plain attributes of
    ``module`` (None when canonicalizing a template); number the arguments and locals."""

    def __init__(self, module):
        self.module = module
        self.names = {}

    def _local(self, name):
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_FunctionDef(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        node.body, node.decorator_list, node.returns = body, [], None
        for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
            arg.annotation = None
            if arg.arg != "self":
                arg.arg = self._local(arg.arg)
        for arg in (node.args.vararg, node.args.kwarg):
            if arg is not None:
                arg.annotation = None
                arg.arg = self._local(arg.arg)
        node.body = self._statements(node.body)
        return node

    def _statements(self, statements):
        out = []
        for stmt in statements:
            new = self.visit(stmt)
            out.extend(new if isinstance(new, list) else [new] if new is not None else [])
        return out

    def visit_If(self, node):
        decided = _decide(node.test, self.module)
        if decided is None:
            self.generic_visit(node)
            return node
        return self._statements(node.body if decided else node.orelse)

    def visit_IfExp(self, node):
        decided = _decide(node.test, self.module)
        if decided is None:
            return self.generic_visit(node)
        return self.visit(node.body if decided else node.orelse)

    def visit_AnnAssign(self, node):
        if node.value is None:
            return None
        return self.visit(ast.Assign(targets=[node.target], value=node.value, lineno=0))

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store) or node.id in self.names:
            node.id = self._local(node.id)
        return node


_PLAIN = (bool, int, float, str, type(None))


def _decide(test, module):
    """The value of an ``if`` test made only of constants and plain (bool, number, str, None)
    attributes of module, or None when it depends on anything else."""
    if module is None:
        return None

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            v = getattr(module, node.attr, LookupError)
            if isinstance(v, _PLAIN):
                return v
        raise LookupError

    ops = {
        ast.Is: lambda a, b: a is b,
        ast.IsNot: lambda a, b: a is not b,
        ast.Eq: lambda a, b: a == b,
        ast.NotEq: lambda a, b: a != b,
    }

    def evaluate(node):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not evaluate(node.operand)
        if isinstance(node, ast.BoolOp):
            results = [evaluate(v) for v in node.values]
            return all(results) if isinstance(node.op, ast.And) else any(results)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in ops:
            return ops[type(node.ops[0])](value(node.left), value(node.comparators[0]))
        return bool(value(node))

    try:
        return evaluate(test)
    except LookupError:
        return None


def _canonical(functions, module=None) -> str:
    """One string for a set of FunctionDefs (forward and its helpers), sorted by name."""
    out = []
    for fn in sorted(functions, key=lambda f: f.name):
        out.append(ast.unparse(_Canonicalize(module).visit(fn)))
    return "\n".join(out)


def _parse(source: str):
    return [n for n in ast.parse(textwrap.dedent(source)).body if isinstance(n, ast.FunctionDef)]


@functools.cache
def _known_formulas():
    return {
        _canonical(_parse(src.replace("self.eps", f"self.{attr}"))): formula._replace(eps_attr=attr)
        for src, formula in _FORMULAS.items()
        for attr in _EPS_ATTRS
    }


# The module names the formulas use: in the matched code they must be torch's.
_MODULES = {"torch": torch, "nn": nn, "F": nn.functional}


def _modules_are_torchs(function, namespace):
    """Whether every name of _MODULES that function reads is, in namespace (its globals),
    the module of torch it names in the formulas."""
    return all(
        namespace.get(node.id) is _MODULES[node.id]
        for node in ast.walk(function)
        if isinstance(node, ast.Name) and node.id in _MODULES
    )


@functools.cache
def _class_functions(cls):
    """The parsed ``forward`` of cls and of every method it calls on ``self`` (recursively),
    forward first; None when their source is unavailable or names other than torch's modules
    ``torch``, ``nn`` or ``F``."""
    functions, todo, seen = [], ["forward"], set()
    while todo:
        name = todo.pop(0)
        seen.add(name)
        fn = getattr(cls, name, None)
        fn = inspect.unwrap(fn) if inspect.isfunction(fn) else None
        if fn is None or fn is getattr(nn.Module, name, None):
            continue
        try:
            parsed = _parse(inspect.getsource(fn))
        except (OSError, TypeError, SyntaxError):
            return None
        if len(parsed) != 1 or not _modules_are_torchs(parsed[0], fn.__globals__):
            return None
        functions.append(parsed[0])
        for node in ast.walk(parsed[0]):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self"
                and node.func.attr not in seen
            ):
                todo.append(node.func.attr)
    return tuple(functions) if functions and functions[0].name == "forward" else None


@functools.cache
def _class_formula(cls):
    """The _Formula of cls's forward when no ``if`` in it can depend on the instance, else
    the string "per instance"; None when it is no known formula."""
    functions = _class_functions(cls)
    if functions is None:
        return None
    if any(isinstance(n, (ast.If, ast.IfExp)) for f in functions for n in ast.walk(f)):
        return "per instance"
    return _known_formulas().get(_canonical(copy.deepcopy(functions)))


def _formula_of(module):
    """The _Formula that module's forward is (as this instance's attributes decide its
    ``if`` tests), or None."""
    formula = _class_formula(type(module))
    if formula == "per instance":
        functions = copy.deepcopy(_class_functions(type(module)))
        return _known_formulas().get(_canonical(functions, module))
    return formula


# ---- the swap ----


class UnweightedRMSNorm(nn.Module):
    """RMSNorm without a weight, of any hidden size: ``forward(x)`` is
    ``accel_torch.rmsnorm(x, None, eps)``, x (..., N) -> (..., N) of x's dtype. What
    replace_rmsnorm puts in place of a weightless norm whose size is not known in advance."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = check_eps(eps)

    def forward(self, x):
        return rmsnorm(x, None, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class PromotingRMSNorm(TritonRMSNorm):
    """TritonRMSNorm with ``casting="llama"`` and the output dtype of the Hugging Face norm it
    replaces where the weight's dtype is not x's. What replace_rmsnorm puts in place of the
    Llama, Llama 4 and T5 formulas, whose outputs are ``weight * xhat`` in the dtype torch
    promotes them to (fp32 for an fp32 weight and bf16 x, as under autocast).

    x (..., N) of any float dtype, weight (N,): ``rule`` says how xhat is rounded:
        "llama": ``y = weight * round(x * rstd)``, xhat rounded to x's dtype; y in
            ``promote_types(x.dtype, weight.dtype)``.
        "t5": xhat is ``x * rstd`` in fp32 (float64 for float64 x), rounded to the weight's
            dtype when that is fp16 or bf16; y in the dtype of weight * xhat.
    Both are the kernels' ``casting="llama"`` where the weight and x share a dtype ("llama":
    also where the promoted dtype is x's); elsewhere the kernels normalize and torch scales.
    ``forward(x, residual=None)`` is TritonRMSNorm's, with y in that dtype.
    """

    def __init__(self, hidden_size: int, eps: float, rule: str):
        if rule not in ("llama", "t5"):
            raise ValueError(f"rule must be 'llama' or 't5', got {rule!r}")
        super().__init__(hidden_size, check_eps(eps), casting="llama")
        self.rule = rule

    def forward(self, x, residual=None):
        if (
            not isinstance(x, torch.Tensor)
            or x.dtype == self._parameters["weight"].dtype  # the common case, checked first
            or self._promotes_to_x(x.dtype)
        ):
            return TritonRMSNorm.forward(self, x, residual)
        if residual is None:
            return self._promoted(x)
        y0, h = rmsnorm_residual_fused(
            x, residual, None, self.eps, return_residual=True, residual_dtype=self.residual_dtype
        )
        if self.rule == "llama" and h.dtype == x.dtype:
            return self.weight * y0, h  # y0 is round(h * rstd) in h's dtype: Llama's xhat
        return self._promoted(h), h  # xhat in another dtype than y0's: normalized again

    def _promotes_to_x(self, dtype) -> bool:
        return self.rule == "llama" and torch.promote_types(dtype, self.weight.dtype) == dtype

    def _promoted(self, x):
        w = self.weight
        if self.rule == "llama":
            return w * rmsnorm(x, None, self.eps)
        xhat = rmsnorm(x.to(torch.promote_types(x.dtype, torch.float32)), None, self.eps)
        if w.dtype in (torch.float16, torch.bfloat16):
            xhat = xhat.to(w.dtype)
        return w * xhat

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule!r}"


class Swapped(NamedTuple):
    path: str
    original: str  # the class name of the module replaced
    numerics: str  # the formula and accel_torch's arguments for it


class LeftAlone(NamedTuple):
    path: str
    original: str
    reason: str


class RMSNormReplacement(int):
    """What :func:`replace_rmsnorm` did. It is the number of modules swapped (an int: compare,
    add and print it as one), with the details in ``swapped`` (tuple of Swapped(path,
    original, numerics)) and ``left_alone`` (tuple of LeftAlone(path, original, reason), for
    RMSNorm-named modules it did not swap); ``report()`` is them as text."""

    swapped: tuple
    left_alone: tuple

    def __new__(cls, swapped, left_alone):
        self = super().__new__(cls, len(swapped))
        self.swapped, self.left_alone = tuple(swapped), tuple(left_alone)
        return self

    def __reduce__(self):  # copy and pickle: int's would call __new__ with the count
        return (type(self), (self.swapped, self.left_alone))

    def report(self) -> str:
        lines = [f"replace_rmsnorm: swapped {len(self.swapped)} modules"]
        lines += _grouped(self.swapped)
        if self.left_alone:
            lines.append(f"left alone {len(self.left_alone)} modules")
            lines += _grouped(self.left_alone)
        return "\n".join(lines)


def _grouped(rows, shown=3):
    groups = {}
    for path, original, what in rows:
        groups.setdefault((original, what), []).append(path or "<root>")
    lines = []
    for (original, what), paths in groups.items():
        more = f", ... ({len(paths) - shown} more)" if len(paths) > shown else ""
        lines.append(f"  {len(paths)} x {original}: {what}: {', '.join(paths[:shown])}{more}")
    return lines


def _replacement(module):
    """(the accel_torch module reproducing module, its numerics) or (None, why not); (None,
    None) for modules that are no RMSNorm at all."""
    if isinstance(module, (TritonRMSNorm, UnweightedRMSNorm)):
        return None, None
    if type(module).forward is nn.RMSNorm.forward and isinstance(module, nn.RMSNorm):
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            return None, f"normalizes over the last {len(shape)} dimensions"
        # torch's eps=None is the eps of its fp32 arithmetic (for 16- and 32-bit inputs), not
        # finfo(x.dtype).eps as its documentation says: 1.2e-7 in bf16, not 0.0078.
        eps = torch.finfo(torch.float32).eps if module.eps is None else module.eps
        affine = module.weight is not None
        new = TritonRMSNorm(shape[0], eps, elementwise_affine=affine)
        return _with_weight(new, module.weight), "torch.nn.RMSNorm, casting='fp32'"
    if next(module.children(), None) is not None:
        # A norm has no submodules: this is a block, searched instead (its norms swapped).
        return None, _A_BLOCK if "RMSNorm" in type(module).__name__ else None
    formula = _formula_of(module)
    if formula is None:
        return None, _NOT_A_FORMULA if "RMSNorm" in type(module).__name__ else None
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        return None, "its forward is patched or hooked on this instance"
    eps = getattr(module, formula.eps_attr, None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        return None, f"its eps ({formula.eps_attr}={eps!r}) is not a finite number >= 0"
    if not formula.weighted:
        return UnweightedRMSNorm(eps), f"{formula.name} formula, no weight"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None, "its weight is not a 1-d Parameter"
    if formula.dtypes != "x":
        new = PromotingRMSNorm(weight.shape[0], eps, formula.dtypes)
    else:
        new = TritonRMSNorm(
            weight.shape[0],
            eps,
            elementwise_affine=True,
            weight_offset=formula.weight_offset,
            casting=formula.casting,
        )
    offset = f", weight_offset={formula.weight_offset}" if formula.weight_offset else ""
    return _with_weight(new, weight), f"{formula.name} formula, casting={formula.casting!r}{offset}"


def _with_weight(new, weight):
    # The module's own Parameter: tied weights, optimizers and devices stay as they were.
    if weight is not None:
        new.weight = weight
    return new


def _swap_children(parent, prefix, done, swapped, left_alone):
    """Swap parent's children (depth first, in order); done maps id(module) to its
    replacement (or None), so a module held in several places is handled once."""
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if id(child) in done:
            if done[id(child)] is not None:
                setattr(parent, name, done[id(child)])
            continue
        new, what = _replacement(child)
        done[id(child)] = new
        if new is None:
            if what is not None:
                left_alone.append(LeftAlone(prefix + name, type(child).__name__, what))
            _swap_children(child, f"{prefix}{name}.", done, swapped, left_alone)
            continue
        new.train(child.training)
        setattr(parent, name, new)
        swapped.append(Swapped(prefix + name, type(child).__name__, what))


def replace_rmsnorm(model: nn.Module, verbose: bool = False) -> RMSNormReplacement:
    """Swap, in place, every RMSNorm submodule of model that accel_torch reproduces for an
    accel_torch module with the same weight (the same Parameter) and numerics.

    Swapped: ``torch.nn.RMSNorm`` over one dimension (``casting="fp32"``), and any module
    whose forward is one of the Hugging Face RMSNorm formulas (see the module docstring):
    Llama-style (:class:`PromotingRMSNorm`, ``casting="llama"``; Llama, Mistral, Qwen,
    DeepSeek, Granite, GLM, T5, ...), fp32 style (OLMo 2/3, Helium, Gemma 3n, ``F.rms_norm``
    in fp32, ...), Gemma-style ``1 + weight`` (``weight_offset=1.0``; Gemma 1-3, VaultGemma,
    Qwen3-Next, T5Gemma, ...), and weightless ones (:class:`UnweightedRMSNorm`). Their
    outputs are the same as before, in the same dtype, whatever the dtypes of the weight and
    the activations (an fp32 weight with bf16 activations included): bit for bit where the
    kernels' row sums round as torch's do, except that fp32-style ones may differ by 1 ulp
    where x * (rstd * w) and (x * rstd) * w round apart, and that float64 inputs are
    computed in float64 (Hugging Face's formulas compute them in fp32). Everything else
    (gated or grouped norms, other roundings) is left alone; those named ``*RMSNorm*`` are
    reported.

    Args:
        model: the nn.Module to modify (its submodules are swapped, not model itself).
        verbose: print the report of what was swapped and left alone.
    Returns:
        An :class:`RMSNormReplacement`: the number of modules swapped, as an int, with
        ``.swapped``, ``.left_alone`` and ``.report()``.
    """
    swapped, left_alone, done = [], [], {}
    new, why = _replacement(model)
    if new is not None:
        why = "the model itself (replace_rmsnorm swaps submodules; wrap it in one)"
    if why is not None:
        left_alone.append(LeftAlone("", type(model).__name__, why))
    _swap_children(model, "", done, swapped, left_alone)
    result = RMSNormReplacement(swapped, left_alone)
    if verbose:
        print(result.report())
    return result
