"""DTensor sharding rules for the three custom ops (tensor, sequence and data parallel).

For each op, the placements under which running it on every rank's local shard gives the
sharded result, per mesh dimension (DTensor combines them over the mesh's dimensions):

* rows sharded, ``Shard(d)`` on any dim but the last: every rank normalizes its own rows.
  Outputs keep the placement, ``rstd`` (one value per row) is sharded the same way, and the
  backward's ``dweight`` is ``Partial("sum")``: each rank holds the sum over its rows, and
  the sum over ranks happens once, where the gradient meets its replicated weight.
* ``Replicate()``: every rank computes the whole result (``dweight`` then is Replicate).
* the weight is always Replicate; an absent output (the empty ``(0,)`` tensor an op
  returns for no weight or no residual gradient) is Replicate.

A DTensor sharded on the last (normalized) dim matches none of these, so DTensor first
redistributes it to a placement that does (a row sharding or Replicate, whichever it
prices cheaper): correct, at the cost of moving the activation once. Partial inputs are
reduced first the same way.

Registering imports ``torch.distributed.tensor`` (most of a second), so ``import
accel_torch`` does not do it: :func:`register_on_dtensor_import` defers the registration
until something imports DTensor, which any DTensor input has done before it exists.
"""

import importlib.abc
import sys

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"
_registered = False


def _row_dims(spec) -> range:
    """The dims of a (..., N) tensor that can be sharded without splitting a row."""
    return range(spec.ndim - 1)


def _fwd_rules(x, n_outputs, other_inputs):
    """Placement lists for a forward of x: n_outputs outputs shaped like x or its rows,
    then x, then other_inputs (None for a non-tensor, else "row" or "replicate")."""
    from torch.distributed.tensor import Replicate, Shard

    def inputs(p):
        return [p] + [
            None if kind is None else p if kind == "row" else Replicate() for kind in other_inputs
        ]

    rules = [([Replicate()] * n_outputs, inputs(Replicate()))]
    for d in _row_dims(x):
        rules.append(([Shard(d)] * n_outputs, inputs(Shard(d))))
    return rules


def _rmsnorm_fwd_rule(x, weight, eps, weight_offset, llama):
    weight_kind = None if weight is None else "replicate"
    return _fwd_rules(x, 2, [weight_kind, None, None, None])


def _rmsnorm_residual_fwd_rule(x, residual, weight, eps, weight_offset, llama, h_dtype):
    weight_kind = None if weight is None else "replicate"
    return _fwd_rules(x, 3, ["row", weight_kind, None, None, None, None])


def _rmsnorm_bwd_rule(dy, x, weight, rstd, dh, weight_offset, dres_dtype):
    """(dx, dres, dweight) from (dy, x, weight, rstd, dh, ...)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    def rule(row, dweight):
        dres = row if dres_dtype is not None else Replicate()
        if weight is None:
            dweight = Replicate()
        w = None if weight is None else Replicate()
        d_h = None if dh is None else row
        return [row, dres, dweight], [row, row, w, row, d_h, None, None]

    rules = [rule(Replicate(), Replicate())]
    for d in _row_dims(x):
        rules.append(rule(Shard(d), Partial("sum")))
    return rules


# Positional index of each op's first non-tensor argument: the rules depend on those
# arguments (dres_dtype decides whether dres is a real output), so DTensor must key its
# cache of sharding decisions on them too.
_STATIC_ARGNUM = {"rmsnorm_fwd": 2, "rmsnorm_residual_fwd": 3, "rmsnorm_bwd": 5}
_RULES = {
    "rmsnorm_fwd": _rmsnorm_fwd_rule,
    "rmsnorm_residual_fwd": _rmsnorm_residual_fwd_rule,
    "rmsnorm_bwd": _rmsnorm_bwd_rule,
}


def register_sharding_rules() -> None:
    """Register the rules with DTensor (idempotent). Imports torch.distributed.tensor."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    from . import ops  # noqa: F401  (defines the ops)

    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, rule in _RULES.items():
        op = getattr(torch.ops.accel_torch, name).default
        register_sharding(op)(rule)
        # register_sharding keys the cache on int arguments only; ours are float/bool/dtype.
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
            _STATIC_ARGNUM[name], needs_pytree=True
        )
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of torch.distributed.tensor so that the rules
    are registered right after that module has run, then steps out of sys.meta_path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DTENSOR_MODULE:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = (
                finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            )
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_sharding_rules()

    def __getattr__(self, name):
        return getattr(self._loader, name)


def register_on_dtensor_import() -> None:
    """Register the rules now if DTensor is loaded, else as soon as it is imported.
    Does nothing where torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return
    if _DTENSOR_MODULE in sys.modules:
        register_sharding_rules()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
