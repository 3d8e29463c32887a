"""Fakes for the bench's tests: a synthetic results dictionary, assembled the way
bench.runner.run assembles one, and stand-ins for peer packages that cannot be installed
here (quack-kernels needs CUDA): an installed one with the real API and math, or a broken one.
"""

import importlib.abc
import importlib.machinery
import sys
import types

from bench import impls
from bench.runner import Config, assemble, impl_entry, new_record
from bench.shapes import bytes_moved, parse_shapes

SHAPES = "2048x4096,256x4096"
OPS = ["fwd", "fused", "fwdbwd"]
# Made-up cold device times (us) of the bf16 forward at 2048x4096, scaled by bytes moved;
# warm is 60 % of cold.
COLD = {
    "torch_eager": 60.0,
    "torch_rms_norm": 30.0,
    "accel_torch": 20.0,
    "jax_xla": 25.0,
    "flax_linen": 28.0,
    "accel_jax": 21.0,
}
MISSING = {"liger": "liger_kernel.ops.rms_norm not installed", "torch_compile": None}


def synthetic_results(kind: str = "cuda", shapes: str | tuple = SHAPES) -> dict:
    cfg = Config(shapes=parse_shapes(shapes), ops=OPS, dtype="bf16")
    device = {
        "kind": kind,
        "name": "Fake GPU" if kind == "cuda" else "x86_64",
        "l2_bytes": 50 << 20,
    }
    infos = [
        impl_entry(i, MISSING.get(i.name) if i.name == "liger" else None) for i in impls.REGISTRY
    ]
    records, floors, host = [], [], []
    for shape in cfg.shapes:
        for op in OPS:
            nbytes = bytes_moved(op, shape, "bf16")
            for fw in ("torch", "jax"):
                floors.append(
                    {
                        "framework": fw,
                        "shape": shape.name,
                        "op": op,
                        "bytes": nbytes,
                        "copied_bytes": nbytes,
                        "cold_us": 16.7 * nbytes / 33554432,
                        "warm_us": 8.6 * nbytes / 33554432,
                    }
                )
            for impl in impls.REGISTRY:
                rec = new_record(impl, shape, op, "bf16")
                records.append(rec)
                if impl.name == "liger":
                    rec.update(status="missing", reason=MISSING["liger"])
                    continue
                if impl.name == "torch_compile" and op == "fwdbwd":
                    rec.update(status="error", reason="RuntimeError: fake failure")
                    continue
                cold = COLD.get(impl.name, 40.0) * nbytes / 33554432
                rec.update(
                    cold_us=cold if kind == "cuda" else None, warm_us=0.6 * cold, first_call_s=0.5
                )
                if op == "fwdbwd":
                    rec["peak_mem_bytes"] = 3 * shape.numel * 2
                if impl.framework == "jax":
                    rec["kernels"] = ["fusion"]
    for op in OPS:
        for impl in impls.REGISTRY:
            if impl.name != "liger":
                host.append(
                    {
                        "impl": impl.name,
                        "label": impl.label,
                        "framework": impl.framework,
                        "op": op,
                        "shape": "1x4096",
                        "calls": 10,
                        "us_per_call": 12.5,
                        "status": "ok",
                        "reason": None,
                    }
                )
    big = {
        "buffer_bytes": 1 << 30,
        "bytes_moved": 2 << 30,
        "us": 700.0,
        "gbps": (2 << 30) / 700.0 / 1e3,
    }
    return assemble(cfg, device, infos, big, floors, records, host, ["a note"])


def fake_quack(monkeypatch) -> list[dict]:
    """Install a stand-in ``quack`` / ``quack.rmsnorm``; returns the list its calls go to.

    ``rmsnorm`` has quack-kernels 0.6.5's signature and its math (its ``rmsnorm_ref``: the
    residual added in fp32, y from that unrounded sum, residual_out = the sum rounded to the
    residual's dtype; ``(y, residual_out)`` only with a residual and ``prenorm=True``), in
    plain torch with torch's autograd.
    """
    import torch

    calls: list[dict] = []

    def rmsnorm(
        x,
        weight=None,
        bias=None,
        residual=None,
        out_dtype=None,
        residual_dtype=None,
        eps=1e-6,
        prenorm=False,
        weight_offset=0.0,
    ):
        calls.append(
            dict(
                bias=bias,
                residual=residual,
                out_dtype=out_dtype,
                residual_dtype=residual_dtype,
                eps=eps,
                prenorm=prenorm,
                weight_offset=weight_offset,
            )
        )
        xf = x.float() if residual is None else x.float() + residual.float()
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        if weight is not None:
            out = out * (weight.float() + weight_offset)
        out = out.to(out_dtype or x.dtype)
        if residual is None or not prenorm:
            return out
        return out, xf.to(residual_dtype or residual.dtype)

    pkg = types.ModuleType("quack")
    pkg.__path__ = []
    mod = types.ModuleType("quack.rmsnorm")
    mod.rmsnorm = pkg.rmsnorm = rmsnorm
    monkeypatch.setitem(sys.modules, "quack", pkg)
    monkeypatch.setitem(sys.modules, "quack.rmsnorm", mod)
    return calls


class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``name`` and fails while executing it, as an installed but broken package does."""

    def __init__(self, name: str, error: BaseException):
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def exec_module(self, module):
        raise self.error


def broken_package(monkeypatch, name: str, error: BaseException) -> None:
    """Make ``import name`` (and its submodules) raise ``error`` from inside the package."""
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Broken(name, error), *sys.meta_path])
