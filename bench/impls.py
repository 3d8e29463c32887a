"""The implementations compared, each where installed: a registry of peers.

Every implementation gives, per op, a pure function of the op's arrays:

- ``fwd``:    ``f(x, w) -> y``
- ``fused``:  ``f(x, r, w) -> (y, h)`` with ``h = x + r`` rounded to x's dtype
- ``fwdbwd``: ``f(x, w, dy) -> (dx, dw)`` (torch; x and w are leaves requiring grad) or
  ``(y, dx, dw)`` (JAX; y is returned so XLA cannot drop the forward's output)

x, r, dy are (M, N) in the benchmark dtype; w is (N,) in the same dtype. All compute the
contract's "fp32" casting: statistics and scaling in fp32, one rounding to x's dtype.
Where a peer's math differs from that (another rounding, an approximate rsqrt), its
``op_note`` says how, and the reports print it beside the numbers.
A peer that is not installed (or cannot run here) says why instead of failing.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.shapes import Shape

TORCH, JAX = "torch", "jax"


@dataclass(frozen=True)
class Impl:
    """One implementation: how to check for it and how to build its per-op functions."""

    name: str  # registry key, used by --impls and in the JSON
    label: str  # short column label
    framework: str  # TORCH or JAX
    project: bool  # True for this project's kernels (accel_torch / accel_jax)
    description: str
    check: Callable[[], str | None]  # None when importable, else the reason
    build_op: Callable[[str, float], Callable]  # (op, eps) -> f(*arrays)
    op_check: Callable[[str], str | None] = field(default=lambda op: None)
    # How this implementation's ``op`` differs from the contract's math (None: it does not).
    op_note: Callable[[str], str | None] = field(default=lambda op: None)
    needs_cuda: bool = False  # cannot run at all without a GPU (e.g. Triton-only peers)
    cpu_default: bool = True  # run by default on a CPU-only machine

    def unavailable(self, on_gpu: bool, requested: bool = False) -> str | None:
        """Why this implementation cannot (or by default does not) run here; None if it can."""
        reason = self.check()
        if reason:
            return reason
        if self.needs_cuda and not on_gpu:
            return "needs a CUDA GPU (its kernels are CUDA-only)"
        if not on_gpu and not self.cpu_default and not requested:
            return "skipped on CPU by default (slow to compile); name it in --impls to run it"
        return None

    def op_unavailable(self, op: str) -> str | None:
        """Why this implementation has no version of ``op``; None if it has one."""
        return self.op_check(op)

    def build(self, op: str, eps: float) -> Callable:
        """The pure function computing ``op`` (see the module docstring for its signature)."""
        return self.build_op(op, eps)


def _import_reason(module: str, hint: str = "", name: str | None = None) -> str | None:
    """None when ``module`` imports, else why: "<name> not installed<hint>" or the error.

    Only a missing ``module`` (or a package above it) counts as not installed; an installed
    package whose own imports fail (a missing dependency, a CUDA DSL that cannot start) is
    reported with its error.
    """
    name = name or module
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything else
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        if missing and (module == missing or module.startswith(missing + ".")):
            return f"{name} not installed{hint}"
        return f"{name} failed to import: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------- torch peers


def _torch_eager_fwd(x, w, eps):
    """The contract's math in plain torch ops (what a user writes): upcast, pow, mean, rsqrt."""
    import torch

    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * w.float()).to(x.dtype)


def _torch_F_fwd(x, w, eps):
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _torch_ops(fwd: Callable, op: str, eps: float) -> Callable:
    """Per-op function from a forward ``fwd(x, w, eps)``; fused = add then normalize."""
    import torch

    if op == "fwd":
        return lambda x, w: fwd(x, w, eps)
    if op == "fused":

        def fused(x, r, w):
            h = x + r  # elementwise in fp32, rounded once to x's dtype: the contract's h
            return fwd(h, w, eps), h

        return fused
    if op == "fwdbwd":
        return lambda x, w, dy: torch.autograd.grad(fwd(x, w, eps), (x, w), dy)
    raise ValueError(f"unknown op {op!r}")


def _build_torch_compile(op: str, eps: float) -> Callable:
    import torch

    # A fresh compile per (shape, op): dynamic=False specializes on the shape like a user's
    # first call does, and reset() keeps the recompile limit from silently falling back.
    torch._dynamo.reset()
    if op == "fused":

        def fused_eager(x, r, w):
            h = x + r
            return _torch_eager_fwd(h, w, eps), h

        return torch.compile(fused_eager, dynamic=False)

    def fwd_eager(x, w):
        return _torch_eager_fwd(x, w, eps)

    compiled = torch.compile(fwd_eager, dynamic=False)
    return _torch_ops(lambda x, w, _eps: compiled(x, w), op, eps)


def _liger_fused_reason(op: str) -> str | None:
    if op != "fused":
        return None
    try:
        from liger_kernel.ops import LigerFusedAddRMSNormFunction  # noqa: F401
    except Exception as e:
        return f"liger_kernel.ops has no LigerFusedAddRMSNormFunction ({type(e).__name__})"
    return None


def _build_liger(op: str, eps: float) -> Callable:
    # "gemma" casting = everything in fp32, one rounding: the contract's "fp32" casting.
    # in_place=False keeps dy intact across repetitions (dx goes to a new buffer).
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    if op == "fused":
        from liger_kernel.ops import LigerFusedAddRMSNormFunction

        return lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, eps, 0.0, "gemma", False)
    fwd = lambda x, w, eps_: LigerRMSNormFunction.apply(x, w, eps_, 0.0, "gemma", False)
    return _torch_ops(fwd, op, eps)


def _build_accel_torch(op: str, eps: float) -> Callable:
    import accel_torch

    if op == "fused":
        return lambda x, r, w: accel_torch.rmsnorm_residual_fused(
            x, r, w, eps, return_residual=True
        )
    return _torch_ops(lambda x, w, eps_: accel_torch.rmsnorm(x, w, eps_), op, eps)


QUACK_HINT = ": pip install quack-kernels (CUDA, Hopper or newer)"
_QUACK_RSQRT = "rstd from CuTe's fast-math (approximate) fp32 rsqrt"
QUACK_NOTES = {
    "fwd": f"{_QUACK_RSQRT}; otherwise the contract's y = round(x * rstd * w)",
    "fused": "y normalizes the fp32 sum x + r, not h rounded to x's dtype (the same at fp32; "
    "at bf16/fp16 y can differ from the contract's by about an ulp); h itself is the fp32 "
    f"sum rounded once to r's dtype (x's here), as in the contract; {_QUACK_RSQRT}",
    "fwdbwd": f"the backward uses the forward's saved rstd ({_QUACK_RSQRT}); dw = fp32 "
    "per-SM partials summed by torch, rounded once to w's dtype, as in the contract",
}


def _quack_check() -> str | None:
    return _import_reason("quack.rmsnorm", QUACK_HINT, name="quack-kernels")


def _build_quack(op: str, eps: float) -> Callable:
    # quack-kernels 0.6.5: rmsnorm(x, weight, bias=None, residual=None, out_dtype=None,
    # residual_dtype=None, eps=1e-6, prenorm=False, weight_offset=0.0), an autograd Function
    # (rstd saved only when an input requires grad). With a residual and prenorm=True it
    # returns (y, residual_out), residual_out in the residual's dtype.
    from quack.rmsnorm import rmsnorm

    if op == "fused":
        return lambda x, r, w: rmsnorm(x, w, residual=r, eps=eps, prenorm=True)
    return _torch_ops(lambda x, w, eps_: rmsnorm(x, w, eps=eps_), op, eps)


def _torch_F_reason() -> str | None:
    import torch.nn.functional as F

    return None if hasattr(F, "rms_norm") else "this torch has no F.rms_norm (needs >= 2.4)"


# ------------------------------------------------------------------------------- JAX peers


def _jnp_fwd(x, w, eps):
    """The contract's math in plain jnp (what a JAX user writes), jitted by XLA."""
    import jax
    import jax.numpy as jnp

    xf = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * rstd * w.astype(jnp.float32)).astype(x.dtype)


def _flax_fwd_factory(eps: float) -> Callable:
    import flax.linen as nn

    @functools.cache
    def module(dtype):
        # dtype and param_dtype = x's dtype: output in x's dtype, like the other peers.
        return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=dtype)

    return lambda x, w, _eps: module(x.dtype).apply({"params": {"scale": w}}, x)


def _jax_ops(fwd: Callable, op: str, eps: float) -> Callable:
    import jax

    if op == "fwd":
        return lambda x, w: fwd(x, w, eps)
    if op == "fused":

        def fused(x, r, w):
            h = x + r
            return fwd(h, w, eps), h

        return fused
    if op == "fwdbwd":

        def fwdbwd(x, w, dy):
            y, vjp = jax.vjp(lambda x_, w_: fwd(x_, w_, eps), x, w)
            dx, dw = vjp(dy)
            return y, dx, dw

        return fwdbwd
    raise ValueError(f"unknown op {op!r}")


def _build_accel_jax(op: str, eps: float) -> Callable:
    import accel_jax

    if op == "fused":
        return lambda x, r, w: accel_jax.rmsnorm_residual_fused(x, r, w, eps, return_residual=True)
    return _jax_ops(lambda x, w, eps_: accel_jax.rmsnorm(x, w, eps_), op, eps)


def _accel_jax_on(choice: str) -> Callable[[str, float], Callable]:
    """Builds accel_jax's op traced under ``accel_jax.use_backend(choice)``."""

    def build(op: str, eps: float) -> Callable:
        import accel_jax

        f = _build_accel_jax(op, eps)

        def on_backend(*args):
            with accel_jax.use_backend(choice):
                return f(*args)

        return on_backend

    return build


def _mosaic_gpu_reason() -> str | None:
    reason = _import_reason("accel_jax")
    if reason:
        return reason
    from accel_jax import backends

    if not backends.hopper_or_newer():
        return "Mosaic GPU needs an NVIDIA GPU of compute capability 9.0 or newer"
    return None


REGISTRY: tuple[Impl, ...] = (
    Impl(
        "torch_eager",
        "eager",
        TORCH,
        False,
        "torch eager: the unfused composition (upcast, pow, mean, rsqrt, mul, cast)",
        lambda: _import_reason("torch"),
        lambda op, eps: _torch_ops(_torch_eager_fwd, op, eps),
    ),
    Impl(
        "torch_rms_norm",
        "F.rms_norm",
        TORCH,
        False,
        "torch.nn.functional.rms_norm (fused: x + r, then F.rms_norm)",
        _torch_F_reason,
        lambda op, eps: _torch_ops(_torch_F_fwd, op, eps),
    ),
    Impl(
        "torch_compile",
        "compile",
        TORCH,
        False,
        "torch.compile (default mode, dynamic=False) of the eager code",
        lambda: _import_reason("torch"),
        _build_torch_compile,
        cpu_default=False,
    ),
    Impl(
        "liger",
        "liger",
        TORCH,
        False,
        "Liger-Kernel LigerRMSNormFunction / LigerFusedAddRMSNormFunction, casting 'gemma'",
        lambda: _import_reason("liger_kernel.ops.rms_norm", " (pip install liger-kernel)"),
        _build_liger,
        op_check=_liger_fused_reason,
        needs_cuda=True,
    ),
    Impl(
        "quack",
        "quack",
        TORCH,
        False,
        "quack-kernels quack.rmsnorm.rmsnorm (CuTe DSL; fused: residual=r, prenorm=True); "
        "differs from the contract: fast-math rsqrt, and the fused y normalizes the "
        "unrounded fp32 x + r",
        _quack_check,
        _build_quack,
        op_note=QUACK_NOTES.get,
        needs_cuda=True,
    ),
    Impl(
        "accel_torch",
        "accel_torch",
        TORCH,
        True,
        "accel_torch.rmsnorm / rmsnorm_residual_fused (this project, Triton)",
        lambda: _import_reason("accel_torch"),
        _build_accel_torch,
    ),
    Impl(
        "jax_xla",
        "xla",
        JAX,
        False,
        "jax.jit of the jnp composition (XLA fusions)",
        lambda: _import_reason("jax"),
        lambda op, eps: _jax_ops(_jnp_fwd, op, eps),
    ),
    Impl(
        "flax_linen",
        "flax",
        JAX,
        False,
        "flax.linen.RMSNorm applied under jax.jit (dtype = param_dtype = x's dtype)",
        lambda: _import_reason("flax.linen"),
        lambda op, eps: _jax_ops(_flax_fwd_factory(eps), op, eps),
    ),
    Impl(
        "accel_jax",
        "accel_jax",
        JAX,
        True,
        "accel_jax.rmsnorm / rmsnorm_residual_fused (this project, Pallas: Triton lowering, "
        "Mosaic GPU as ACCEL_JAX_BACKEND picks)",
        lambda: _import_reason("accel_jax"),
        _build_accel_jax,
    ),
    Impl(
        "accel_jax_triton",
        "accel_jax:triton",
        JAX,
        True,
        "accel_jax with use_backend('triton'): the Pallas Triton-lowered kernels only (GPU "
        "only: on a CPU every backend runs the same interpreted kernels)",
        lambda: _import_reason("accel_jax"),
        _accel_jax_on("triton"),
        needs_cuda=True,
    ),
    Impl(
        "accel_jax_mgpu",
        "accel_jax:mgpu",
        JAX,
        True,
        "accel_jax with use_backend('mosaic_gpu'): Pallas Mosaic GPU kernels wherever they "
        "serve the shape (kernels_mgpu.supported / supported_bwd), Triton-lowered elsewhere",
        _mosaic_gpu_reason,
        _accel_jax_on("mosaic_gpu"),
        needs_cuda=True,
    ),
)

BY_NAME = {impl.name: impl for impl in REGISTRY}


def select(names: str | None) -> list[Impl]:
    """Implementations named in a comma-separated list (registry order kept); all if None."""
    if not names:
        return list(REGISTRY)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; choose from {', '.join(BY_NAME)}")
    return [impl for impl in REGISTRY if impl.name in wanted]


# ---------------------------------------------------------------------------------- inputs

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_inputs(op: str, shape: Shape, dtype: str, device: str, seed: int = 0) -> tuple:
    """The op's torch arguments: (x, w), (x, r, w) or (x, w, dy) with x, w leaves for fwdbwd.

    x, r, dy: (M, N) standard normal; w: (N,) = 1 + 0.1 * normal; all in ``dtype``.
    """
    import torch

    dt = getattr(torch, TORCH_DTYPES[dtype])
    g = torch.Generator(device="cpu").manual_seed(seed)
    m, n = shape.rows, shape.hidden

    def normal(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=g) * scale + offset).to(device=device, dtype=dt)

    x, w = normal(m, n), normal(n, scale=0.1, offset=1.0)
    if op == "fwd":
        return x, w
    if op == "fused":
        return x, normal(m, n), w
    if op == "fwdbwd":
        return x.requires_grad_(), w.requires_grad_(), normal(m, n)
    raise ValueError(f"unknown op {op!r}")


def jax_inputs(op: str, shape: Shape, dtype: str, seed: int = 0) -> tuple:
    """The op's JAX arguments on the default device: (x, w), (x, r, w) or (x, w, dy)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(TORCH_DTYPES[dtype])
    keys = jax.random.split(jax.random.key(seed), 3)
    m, n = shape.rows, shape.hidden
    x = jax.random.normal(keys[0], (m, n), jnp.float32).astype(dt)
    w = (1.0 + 0.1 * jax.random.normal(keys[1], (n,), jnp.float32)).astype(dt)
    other = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dt)
    if op == "fwd":
        return x, w
    if op == "fused":
        return x, other, w
    if op == "fwdbwd":
        return x, w, other
    raise ValueError(f"unknown op {op!r}")
