"""Sharding rules: where the rows of an RMSNorm are computed when x lives on many devices.

The ops layer (``accel_jax.ops``) calls ``rmsnorm_fwd`` / ``rmsnorm_bwd`` here on N-D
arrays (..., N); each call finds where its inputs live, when it is traced, and runs the
local math (the kernels, or the reference math) on each device's own block:

- ``"local"``: no mesh of several devices: one call on the whole array;
- ``"manual"``: inside a ``shard_map`` (or with Flax's ``axis_name``): the arrays are
  already per-device blocks; ``match_vma`` gives x, residual and weight the same varying
  axes before the custom_vjp, so JAX's own transpose of that cast sums the gradients;
- ``"explicit"``: Explicit mesh axes (the ``jax.make_mesh`` default): a ``jax.shard_map``
  over the mesh with specs read from ``jax.typeof(x)``;
- ``"auto"``: Auto mesh axes: ``custom_partitioning`` (Shardy ``sharding_rule``) whose
  ``partition`` picks the same blocks from the shardings XLA propagated.

Rows sharded (leading axes, over any mesh axes): each device normalizes its rows; dweight
is summed over the row axes in fp32 (one all-reduce of N floats). Hidden axis sharded
(or ``axis_name``): two-phase: per-row local sum of squares, one all-reduce of M fp32
values, local normalize; the backward the same for the row sums ``sum(g * xhat)``; dweight
stays sharded on the hidden axis. The two-phase math is plain jnp (the kernels compute
their statistics over the block they see).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from accel_jax import backends
from accel_jax.reference import reference_bwd, reference_fwd

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Fwd:
    """Static configuration of one forward call (hashable)."""

    eps: float
    weight_offset: float
    llama: bool
    out_dtype: Any
    round_dtype: Any
    need_h: bool
    save: bool
    mode: str  # ops._Spec.mode
    has_residual: bool
    has_weight: bool

    @property
    def n_out(self) -> int:
        return 1 + self.need_h + self.save


@dataclasses.dataclass(frozen=True)
class Bwd:
    """Static configuration of one backward call (hashable).

    keep: leading axes of x over which dweight is not summed (one per vmap level).
    """

    weight_offset: float
    dx_dtype: Any
    dres_dtype: Any
    mode: str
    has_weight: bool
    has_dh: bool
    keep: int = 0


# ---------------------------------------------------------------- where the arrays live


def _axes(entry) -> tuple:
    """Mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _varying(a) -> frozenset:
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _mesh_of(arrays):
    """The (abstract) mesh the arrays are typed on, else the context mesh (may be empty)."""
    for a in arrays:
        sharding = getattr(jax.typeof(a), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty:
            return mesh
    return jax.sharding.get_abstract_mesh()


def _spec_of(a) -> tuple:
    """a's PartitionSpec entries, one per dimension (None where not sharded)."""
    spec = tuple(jax.typeof(a).sharding.spec)
    return spec + (None,) * (a.ndim - len(spec))


def where(*arrays, axis_name=None) -> str:
    """'manual', 'explicit', 'auto' or 'local' for arrays (None entries ignored)."""
    arrays = [a for a in arrays if a is not None]
    if axis_name is not None:
        return "manual"
    mesh = _mesh_of(arrays)
    if mesh.empty:
        return "local"
    types = set(mesh.axis_types)
    # Manual and Explicit axes type the arrays even on a mesh of one device (kernels there
    # would see sharded refs, and a gradient's vma would not match its input's).
    if AxisType.Manual in types:
        return "manual"
    # Explicit even when x is replicated: under vmap its batch axis may be sharded.
    if AxisType.Explicit in types:
        return "explicit"
    return "local" if mesh.size == 1 else "auto"


def match_vma(*arrays):
    """Inside shard_map: cast every array to the union of their varying mesh axes.

    The same implicit cast JAX makes for ``x * w``; its transpose (a psum) then sums
    weight's (or x's) gradient over the axes it was invariant on. None entries pass.
    """
    present = [a for a in arrays if a is not None]
    union = frozenset().union(*(_varying(a) for a in present))
    if not union:
        return arrays
    out = []
    for a in arrays:
        missing = tuple(sorted(union - _varying(a))) if a is not None else ()
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return tuple(out)


def _axis_size(axes) -> int:
    return math.prod(jax.lax.axis_size(a) for a in axes) if axes else 1


# ---------------------------------------------------------------- local math on one block


def fwd_args(cfg) -> dict:
    """The forward's static keyword arguments, from ops' _Spec or this module's Fwd."""
    return dict(
        eps=cfg.eps,
        weight_offset=cfg.weight_offset,
        llama=cfg.llama,
        out_dtype=cfg.out_dtype,
        round_dtype=cfg.round_dtype,
    )


def _w32(weight, weight_offset):
    w = weight.astype(F32)
    return w + weight_offset if weight_offset else w


def _two_phase_fwd(cfg: Fwd, x, residual, weight, hidden):
    """Forward of a block whose hidden axis is split over mesh axes ``hidden``."""
    xf = x.astype(F32)
    h = None
    if residual is not None:
        h = (xf + residual.astype(F32)).astype(cfg.round_dtype)
        xf = h.astype(F32)
    n = x.shape[-1] * _axis_size(hidden)
    rstd = jax.lax.rsqrt(jax.lax.psum(jnp.sum(xf * xf, axis=-1), hidden) / n + cfg.eps)
    r = rstd[..., None]
    if weight is None:
        y = xf * r
    elif cfg.llama:
        y = (xf * r).astype(cfg.round_dtype).astype(F32) * _w32(weight, cfg.weight_offset)
    else:
        y = xf * (r * _w32(weight, cfg.weight_offset))
    return y.astype(cfg.out_dtype), h, rstd


def _kernel_choice(mode: str) -> tuple[bool, str]:
    """(interpret, backend setting) of a kernel mode: "interpret" runs the Triton-lowered
    kernels interpreted, "interpret-mosaic_gpu" Mosaic GPU's where they serve the shape."""
    if mode == "interpret":
        return True, "triton"
    return mode.startswith("interpret"), backends.from_mode(mode)


def local_fwd(cfg: Fwd, x, residual, weight, hidden=()):
    """Forward of one device's block; returns (y, h or None, rstd (x.shape[:-1]) or None).

    hidden: mesh axes the hidden axis is split over (two-phase statistics), else ().
    """
    if hidden:
        y, h, rstd = _two_phase_fwd(cfg, x, residual, weight, hidden)
    elif cfg.mode == "reference":
        y, h, rstd = reference_fwd(x, residual, weight, need_h=cfg.need_h, **fwd_args(cfg))
    else:
        n, lead = x.shape[-1], x.shape[:-1]
        r2 = residual.reshape(-1, n) if residual is not None else None
        args = dict(store_h=cfg.need_h, store_rstd=cfg.save, **fwd_args(cfg))
        dtypes = [a.dtype for a in (x, residual, weight) if a is not None]
        dtypes += [cfg.out_dtype, cfg.round_dtype]
        fused = residual is not None
        interpret, choice = _kernel_choice(cfg.mode)
        chosen = backends.forward_kernels(math.prod(lead), n, fused, dtypes, choice)
        y, h, rstd = chosen.rmsnorm_fwd(x.reshape(-1, n), r2, weight, **args, interpret=interpret)
        y = y.reshape(x.shape)
        h = h.reshape(x.shape) if h is not None else None
        rstd = rstd.reshape(lead) if rstd is not None else None
    return y, (h if cfg.need_h else None), (rstd if cfg.save else None)


def _sum_rows(a, keep: int):
    """Sum a (..., N) over every leading axis from ``keep`` on."""
    return jnp.sum(a, axis=tuple(range(keep, a.ndim - 1)))


def _two_phase_bwd(cfg: Bwd, dy, x, rstd, weight, dh, hidden):
    n = x.shape[-1] * _axis_size(hidden)
    r = rstd[..., None]
    xhat = x.astype(F32) * r
    dyf = dy.astype(F32)
    g = dyf * _w32(weight, cfg.weight_offset) if weight is not None else dyf
    s = jax.lax.psum(jnp.sum(g * xhat, axis=-1, keepdims=True), hidden)
    dx = r * (g - xhat * (s / n))
    if dh is not None:
        dx = dx + dh.astype(F32)
    dweight = _sum_rows(dyf * xhat, cfg.keep) if weight is not None else None
    return dx, dweight


def _rows_bwd(cfg: Bwd, dy, x, rstd, weight, dh, dw32: bool):
    """Backward of rows holding their whole hidden axis: (dx, dres, dweight).

    dw32: return dweight in fp32 (it is summed across devices afterwards).
    """
    w = weight.astype(F32) if (weight is not None and dw32) else weight
    args = dict(weight_offset=cfg.weight_offset, dx_dtype=cfg.dx_dtype, dres_dtype=cfg.dres_dtype)
    n = x.shape[-1]

    def two_d(dy, x, rstd, dh):
        flat = [a.reshape(-1, n) if a is not None else None for a in (dy, x, dh)]
        dy2, x2, dh2 = flat
        if cfg.mode == "reference":
            return reference_bwd(dy2, x2, rstd.reshape(-1), w, dh2, **args)
        dtypes = [a.dtype for a in (dy2, x2, w, dh2) if a is not None] + [cfg.dx_dtype]
        dtypes += [cfg.dres_dtype] if cfg.dres_dtype is not None else []
        interpret, choice = _kernel_choice(cfg.mode)
        # vmapped (cfg.keep): the Triton-lowered kernels, which Pallas batches over a grid axis
        choice = choice if not cfg.keep else "triton"
        chosen = backends.backward_kernels(x2.shape[0], n, dtypes, choice)
        return chosen.rmsnorm_bwd(dy2, x2, rstd.reshape(-1), w, dh2, **args, interpret=interpret)

    lead = x.shape[: cfg.keep]
    if cfg.keep:
        # dweight per leading (vmapped) index: the 2-D backward mapped over those.
        b = math.prod(lead)
        split = [a.reshape(b, -1, n) if a is not None else None for a in (dy, x, dh)]
        dx, dres, dweight = jax.vmap(two_d)(split[0], split[1], rstd.reshape(b, -1), split[2])
        dweight = dweight.reshape(*lead, n) if dweight is not None else None
    else:
        dx, dres, dweight = two_d(dy, x, rstd, dh)
    dx = dx.reshape(x.shape)
    dres = dres.reshape(x.shape) if dres is not None else None
    return dx, dres, dweight


def local_bwd(cfg: Bwd, dy, x, rstd, weight, dh, hidden=(), rows=()):
    """Backward of one device's block; returns (dx, dres or None, dweight or None).

    hidden: mesh axes splitting the hidden axis (two-phase row sums); rows: mesh axes
    splitting the rows that dweight is summed over (one fp32 psum of N values).
    """
    if hidden:
        dx, dweight = _two_phase_bwd(cfg, dy, x, rstd, weight, dh, hidden)
        dres = dx.astype(cfg.dres_dtype) if cfg.dres_dtype is not None else None
        dx = dx.astype(cfg.dx_dtype)
    else:
        dx, dres, dweight = _rows_bwd(cfg, dy, x, rstd, weight, dh, dw32=bool(rows))
    if dweight is not None:
        if rows:
            dweight = jax.lax.psum(dweight.astype(F32), rows)
        dweight = dweight.astype(weight.dtype)
    return dx, dres, dweight


# ---------------------------------------------------------------- blocks from shardings


def _layout(spec, shape, mesh_shape) -> tuple:
    """Spec entries kept for x: those that split their dimension evenly (others: None).
    Axes of size 1 are kept: under Explicit axes they are part of the arrays' types."""
    out = []
    for entry, size in zip(spec, shape, strict=True):
        parts = math.prod(mesh_shape[a] for a in _axes(entry))
        out.append(entry if size % parts == 0 else None)
    return tuple(out)


def _row_axes(layout, keep: int = 0) -> tuple:
    return tuple(a for e in layout[keep:-1] for a in _axes(e))


def _present(*arrays) -> list:
    return [a for a in arrays if a is not None]


def _unpack(items, *present) -> tuple:
    """The inverse of _present: the first of items, then per flag of present the next item
    where True, else None (e.g. (y, h or None, rstd or None) from the present outputs)."""
    it = iter(items)
    first = next(it)
    return (first, *[next(it) if p else None for p in present])


def _fwd_specs(cfg: Fwd, layout):
    rows = P(*layout[:-1])
    return [P(*layout)] * (1 + cfg.need_h) + ([rows] if cfg.save else [])


def _fwd_in_specs(cfg: Fwd, layout):
    specs = [P(*layout)] * (1 + cfg.has_residual)
    return specs + ([P(layout[-1])] if cfg.has_weight else [])


def _bwd_specs(cfg: Bwd, layout):
    specs = [P(*layout)] * (1 + (cfg.dres_dtype is not None))
    return specs + ([P(*layout[: cfg.keep], layout[-1])] if cfg.has_weight else [])


def _bwd_in_specs(cfg: Bwd, layout):
    specs = [P(*layout), P(*layout), P(*layout[:-1])]
    specs += [P(layout[-1])] if cfg.has_weight else []
    return specs + ([P(*layout)] if cfg.has_dh else [])


def _unpack_bwd_inputs(cfg: Bwd, arrays):
    arrays = list(arrays)
    dy, x, rstd = arrays[:3]
    rest = arrays[3:]
    weight = rest.pop(0) if cfg.has_weight else None
    dh = rest.pop(0) if cfg.has_dh else None
    return dy, x, rstd, weight, dh


def _fwd_block(cfg: Fwd, layout):
    hidden = _axes(layout[-1])

    def block(*arrays):
        return tuple(
            _present(*local_fwd(cfg, *_unpack(arrays, cfg.has_residual, cfg.has_weight), hidden))
        )

    return block


def _bwd_block(cfg: Bwd, layout):
    hidden, rows = _axes(layout[-1]), _row_axes(layout, cfg.keep)

    def block(*arrays):
        outs = local_bwd(cfg, *_unpack_bwd_inputs(cfg, arrays), hidden, rows)
        return tuple(_present(*outs))

    return block


# ---------------------------------------------------------------- explicit mesh axes


def _reshard(a, spec):
    if a is None or _spec_of(a) == tuple(spec) + (None,) * (a.ndim - len(spec)):
        return a
    return jax.sharding.reshard(a, NamedSharding(jax.typeof(a).sharding.mesh, spec))


def prepare(x, residual, weight, axis_name=None):
    """Before the custom_vjp: give residual and weight x's placement (the casts JAX itself
    would insert for ``x + residual`` and ``x * w``; their transposes reduce the gradients).

    Inside shard_map: the union of the varying axes (``match_vma``). Explicit mesh axes:
    residual resharded to x's spec, weight to x's hidden-axis spec.
    """
    place = where(x, residual, weight, axis_name=axis_name)
    if place == "manual":
        return match_vma(x, residual, weight)
    if place == "explicit":
        spec = _spec_of(x)
        weight = _reshard(weight, P(spec[-1])) if weight is not None else None
        return x, _reshard(residual, P(*spec)), weight
    return x, residual, weight


def _explicit(block, x_like, arrays, in_specs, out_specs):
    mesh = jax.typeof(x_like).sharding.mesh
    arrays = [_reshard(a, s) for a, s in zip(arrays, in_specs, strict=True)]
    # check_vma=False: the block's collectives are explicit, and Pallas interpret mode
    # cannot be lowered under check_vma (its padding mixes varying and invariant values).
    f = jax.shard_map(
        block, mesh=mesh, in_specs=tuple(in_specs), out_specs=tuple(out_specs), check_vma=False
    )
    return f(*arrays)


# ---------------------------------------------------------------- auto mesh axes


def _io_specs(cfg, layout):
    if isinstance(cfg, Fwd):
        return _fwd_in_specs(cfg, layout), _fwd_specs(cfg, layout)
    return _bwd_in_specs(cfg, layout), _bwd_specs(cfg, layout)


def _block(cfg, layout):
    return (_fwd_block if isinstance(cfg, Fwd) else _bwd_block)(cfg, layout)


def _sharding_rule(cfg, ndim: int) -> str:
    """Shardy rule: every (..., N) array shares x's factors, rstd the row factors, weight
    the hidden factor n, dweight the kept leading factors and n."""
    letters = string.ascii_lowercase[: ndim - 1]
    rows = " ".join(letters)
    full = (rows + " n").strip()
    if isinstance(cfg, Fwd):
        operands = [full] * (1 + cfg.has_residual) + (["n"] if cfg.has_weight else [])
        results = [full] * (1 + cfg.need_h) + ([rows] if cfg.save else [])
    else:
        operands = [full, full, rows] + (["n"] if cfg.has_weight else [])
        operands += [full] if cfg.has_dh else []
        results = [full] * (1 + (cfg.dres_dtype is not None))
        results += [" ".join([*letters[: cfg.keep], "n"])] if cfg.has_weight else []
    return f"{', '.join(operands)} -> {', '.join(results)}"


@functools.cache
def _partitioned(cfg, ndim: int):
    """The block function of cfg for rank-ndim x under custom_partitioning (the layout is
    read from x's, or the saved x's, sharding)."""
    ref = 0 if isinstance(cfg, Fwd) else 1  # the backward's operand 1 is the saved x
    fn = custom_partitioning(_block(cfg, (None,) * ndim))

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        a = arg_shapes[ref]
        spec = tuple(a.sharding.spec) + (None,) * (len(a.shape) - len(a.sharding.spec))
        layout = _layout(spec, a.shape, mesh.shape)
        in_specs, out_specs = _io_specs(cfg, layout)
        named = lambda specs: tuple(NamedSharding(mesh, s) for s in specs)  # noqa: E731
        return mesh, _block(cfg, layout), named(out_specs), named(in_specs)

    fn.def_partition(partition=partition, sharding_rule=_sharding_rule(cfg, ndim))
    return fn


def _placed(cfg, place: str, arrays):
    """cfg's blocks on arrays placed on an Explicit ("explicit") or Auto ("auto") mesh."""
    x = arrays[0] if isinstance(cfg, Fwd) else arrays[1]
    if place == "auto":
        return _partitioned(cfg, x.ndim)(*arrays)
    layout = _layout(_spec_of(x), x.shape, jax.typeof(x).sharding.mesh.shape)
    in_specs, out_specs = _io_specs(cfg, layout)
    return _explicit(_block(cfg, layout), x, arrays, in_specs, out_specs)


@functools.cache
def _batched(cfg, ndim: int, place: str):
    """_placed under custom_vmap: a vmapped axis becomes one more leading row axis (neither
    custom_partitioning nor Pallas inside shard_map can be batched by JAX itself)."""
    fn = custom_vmap(lambda *arrays: _placed(cfg, place, arrays))
    fn.def_vmap(functools.partial(_vmap_rule, cfg, ndim, place))
    return fn


def _vmap_rule(cfg, ndim, place, axis_size, in_batched, *arrays):
    """vmap of a block call: the batch axis (at 0) is one more leading row axis; dweight
    is kept per batch entry. A batched weight has no such form: one call per entry."""
    if isinstance(cfg, Fwd):
        w_index = 1 + cfg.has_residual if cfg.has_weight else None
        n_out = cfg.n_out
    else:
        w_index = 3 if cfg.has_weight else None
        n_out = 1 + (cfg.dres_dtype is not None) + cfg.has_weight
    if w_index is not None and in_batched[w_index]:
        fn = _batched(cfg, ndim, place)
        idx = [i for i, b in enumerate(in_batched) if b]

        def one(batched):
            full = list(arrays)
            for i, a in zip(idx, batched, strict=True):
                full[i] = a
            return fn(*full)

        return jax.lax.map(one, [arrays[i] for i in idx]), (True,) * n_out
    full = [
        a if b or i == w_index else jnp.broadcast_to(a, (axis_size, *a.shape))
        for i, (a, b) in enumerate(zip(arrays, in_batched, strict=True))
    ]
    inner = cfg if isinstance(cfg, Fwd) else dataclasses.replace(cfg, keep=cfg.keep + 1)
    return _batched(inner, ndim + 1, place)(*full), (True,) * n_out


# ---------------------------------------------------------------- entry points


def _call(cfg, place, arrays, hidden=()):
    """Run cfg's block on arrays (x-rank N-D) where they live; returns present outputs."""
    x = arrays[0] if isinstance(cfg, Fwd) else arrays[1]
    if place == "explicit" or (place == "auto" and x.ndim >= 2):
        return _batched(cfg, x.ndim, place)(*arrays)
    layout = (None,) * (x.ndim - 1) + (tuple(hidden) or None,)
    return _block(cfg, layout)(*arrays)


def _names(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def rmsnorm_fwd(
    x,
    residual,
    weight,
    *,
    eps,
    weight_offset,
    llama,
    out_dtype,
    round_dtype,
    need_h,
    save,
    mode,
    axis_name=None,
):
    """Forward on (..., N) arrays wherever they live.

    x: (..., N); residual: None or x's shape; weight: None or (N,) (per-device blocks
    inside shard_map). axis_name: mesh / named axes the hidden axis is split over (Flax's
    axis_name: statistics over the whole row). Returns (y (..., N) out_dtype, h (..., N)
    round_dtype or None, rstd (...,) fp32 or None).
    """
    cfg = Fwd(
        eps=eps,
        weight_offset=weight_offset,
        llama=llama,
        out_dtype=out_dtype,
        round_dtype=round_dtype,
        need_h=need_h,
        save=save,
        mode=mode,
        has_residual=residual is not None,
        has_weight=weight is not None,
    )
    place = where(x, residual, weight, axis_name=axis_name)
    hidden = _names(axis_name) if axis_name is not None else ()
    outs = _call(cfg, place, _present(x, residual, weight), hidden)
    return _unpack(outs, cfg.need_h, cfg.save)


def rmsnorm_bwd(
    dy, x, rstd, weight, dh, *, weight_offset, dx_dtype, dres_dtype, mode, axis_name=None
):
    """Backward on (..., N) arrays wherever they live.

    dy: (..., N) cotangent of y; x: the saved input (x, or h when fused); rstd: (...,) fp32;
    weight: None or (N,); dh: None or the cotangent of h. Returns (dx in dx_dtype, dres in
    dres_dtype or None, dweight in weight's dtype or None).
    """
    cfg = Bwd(
        weight_offset=weight_offset,
        dx_dtype=dx_dtype,
        dres_dtype=dres_dtype,
        mode=mode,
        has_weight=weight is not None,
        has_dh=dh is not None,
    )
    place = where(dy, x, weight, dh, axis_name=axis_name)
    hidden = _names(axis_name) if axis_name is not None else ()
    outs = _call(cfg, place, _present(dy, x, rstd, weight, dh), hidden)
    return _unpack(outs, cfg.dres_dtype is not None, cfg.has_weight)
