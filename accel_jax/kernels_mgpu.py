"""Pallas Mosaic GPU kernels (Hopper and newer): the RMSNorm forward (plain and fused) and
backward.

The same numerics as ``accel_jax.kernels`` (all in fp32):

    ss = sum(x * x);  rstd = 1 / sqrt(ss / N + eps);  xhat = x * rstd
    fp32 casting:  y = round_out(xhat * w)
    llama casting: y = round_out(round_in(xhat) * w)

One program is one warpgroup (128 threads) and normalizes R whole rows, read from global
memory straight into registers as 16-byte vectors and written back the same way: no shared
memory staging, no masks. The rows of a program are split over its four warps (``R = 4``: a
warp per row, the row sums stay inside a warp; ``R = 2``: two warps per row, summed across
warps by Mosaic GPU's reduction through shared memory). The last program starts at row
``M - R`` instead of past the end, so it recomputes (and rewrites with the same bits) a few
rows of its neighbour rather than reading out of bounds.

The backward spreads each row over all four warps (a thread holds N / 128 of x, dy, the
weight and the dweight accumulator) and runs G programs that each walk rows pid, pid + G,
..., the loads of the next ``BWD_PREFETCH`` rows in flight while a row is reduced and
stored. Each program adds its rows' dy * xhat into an fp32 register accumulator: one (G, N)
fp32 partial row each, summed in a fixed order afterwards (deterministic dweight, no
atomics). Where N does not split over four warps it walks blocks of two or four rows
instead, as the forward holds them (``bwd_rows``; M a multiple of the block), with R
partial rows a program.

Rows wider than that (forward past ``MAX_COLS``, backward past ``BWD_MAX_COLS``) are held
by several warpgroups of one program, each warp a contiguous segment of a row, the
segments' sums met in shared memory (the grouped kernels), where N splits into such
segments; otherwise (and for the backward past ``BWD_GROUP_MAX_COLS``) they take the
two-walk kernels: each row is read in column chunks twice, once for its sum and once to
write it, and the backward's dweight accumulator lives in shared memory.

``supported`` / ``supported_bwd`` say which shapes these kernels serve: N a multiple of a
row block's vector tile (the 32 lanes of each warp of a row, 16 bytes of the narrowest dtype
each; in the kernels that hold rows in one warpgroup, fewer bytes where N needs it, down to
one element: ``row_vector``) and at most ``WIDE_MAX_COLS``, at least one block of rows.
Everything else goes to the Triton-lowered kernels (or, without them, the reference math).

``interpret=True`` runs the same kernel bodies on the CPU in Mosaic GPU's interpret mode
(every warpgroup a thread, shared memory and barriers simulated, its race detector on),
reading refs whole where the compiled kernels load them in a register layout.
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

try:
    from jax.experimental import pallas as pl
    from jax.experimental.mosaic.gpu import fragmented_array as _fa
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as e:  # a JAX without Pallas Mosaic GPU: ops keeps the Triton kernels
    pl = plgpu = _fa = None
    UNAVAILABLE = f"{type(e).__name__}: {e}"
else:
    UNAVAILABLE = None

# Mosaic GPU's interpret mode (JAX 0.10+; public as plgpu.InterpretGPUParams in later
# releases): the kernels on the CPU, every warpgroup a thread, shared memory and barriers
# simulated, with its race detector.
_InterpretParams = getattr(plgpu, "InterpretGPUParams", None)
if _InterpretParams is None and plgpu is not None:
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import (
            InterpretGPUParams as _InterpretParams,
        )
    except ImportError:
        _InterpretParams = None
INTERPRET_UNAVAILABLE = UNAVAILABLE or (
    None if _InterpretParams else "this JAX has no Mosaic GPU interpret mode"
)
# True while a kernel body is traced for interpret mode (_named): register layouts mean nothing
# (the interpreter holds whole arrays) and ``plgpu.load`` / ``layout_cast`` have no CPU
# implementation, so _load and _cast read refs and pass values as they are.
_INTERPRETING = contextvars.ContextVar("accel_jax_mgpu_interpreting", default=False)

from accel_jax.kernels import (  # noqa: E402
    bwd_refs,
    fwd_out_shape,
    fwd_outputs,
    fwd_refs,
    varying_axes,
)

F32 = jnp.float32
# Rows per program are chosen so that a thread holds at most this many fp32 row elements
# (R * N / 128), which keeps a row's values in registers.
ELEMS_PER_THREAD = 128
# Two rows at least: a program's one-element rstd store would need the scalar path, which
# Mosaic GPU (JAX 0.10) offers only for shared memory.
MAX_COLS = 64 * ELEMS_PER_THREAD
# Rows whose loads a backward program has in flight ahead of the row it computes.
BWD_PREFETCH = 1  # (H200: 2 and 3 were no faster, and slower from 5120 columns)
# Backward programs: each writes one fp32 partial row of dweight (G * N * 4 bytes, written
# and read again), so G stays a few programs per SM.
BWD_MAX_PROGRAMS = 264
# Rows up to 2048 columns: twice the programs (H200: 32768x2048 126.9 -> 102.3 us cold).
BWD_NARROW_COLS = 2048
# Wider rows spill the backward's registers (H200, 4096x7168: 74.0 us against Triton's 54.1).
BWD_MAX_COLS = 5120
# Rows past MAX_COLS (forward) or BWD_MAX_COLS (backward) run the two-walk kernels, in column
# chunks of up to these many elements (R rows of WIDE_CHUNK per forward program; the
# backward's rows span the four warps), up to WIDE_MAX_COLS (the walks are unrolled). H200
# sweep (2048-4096 rows; still 2-17% behind the Triton-lowered kernels): the forward fastest
# with two rows of 4096-column chunks at 8192-16384 columns; the backward with 2048-column
# chunks and twice BWD_MAX_PROGRAMS up to BWD_WIDE_SMALL_COLS (4096x8192: 66.2 us warm, 4096-
# column chunks 79.0, 264 programs 74.8), 4096-column chunks and BWD_MAX_PROGRAMS past it
# (4096x16384: 152.9, 2048-column chunks 157.3, 528 programs 190.7).
WIDE_ROWS = 2
WIDE_CHUNK = 4096
BWD_CHUNK = 4096
BWD_SMALL_CHUNK = 2048
BWD_WIDE_SMALL_COLS = 8192
WIDE_MAX_COLS = 16 * WIDE_CHUNK
# Rows past MAX_COLS (forward) or BWD_MAX_COLS (backward) held in registers by several
# warpgroups of one program instead, where a split fits (_split): each warp holds one
# contiguous segment of a row, at most GROUP_ELEMS (forward, GROUP_ROWS rows per program;
# two at least, for the rstd store) or BWD_GROUP_ELEMS (backward, BWD_GROUP_PROGRAMS
# programs) fp32 elements of each array per thread, and the segments' sums meet in shared
# memory. The backward only up to BWD_GROUP_MAX_COLS: its weight, dweight accumulator, x
# and dy of one row in fp32 (16 N bytes) fill the 256 KB register file of an SM at 16384
# columns. H200 sweep (bench/results/h200/sweeps/mgpu_groups_probe.log): the fused forward
# 3-7% faster than the Triton-lowered one at 9216-16384 columns with two rows of <= 128
# elements (the plain forward tied at 16384 and lost at 12288); the backward tied or won
# at 6144-12288 with 16 elements (4096x7168 51.6 us cold against 54.5, 4096x12288 108.9
# against 114.8), and lost at 16384 (245, two-walk 158, Triton 149). GROUPED False: the
# two-walk kernels for all rows past MAX_COLS / BWD_MAX_COLS.
GROUPED = True
MAX_GROUPS = 8
# Two exchange buffers in turn: a warpgroup that has passed row i's barrier may write row
# i + 1's sums while another still reads row i's (one buffer would race there).
EXCHANGE_BUFFERS = 2
GROUP_ROWS = 2
GROUP_ELEMS = 128
BWD_GROUP_ELEMS = 16
BWD_GROUP_PROGRAMS = 132
BWD_GROUP_MAX_COLS = 12288
# A kernel's name as a Mosaic GPU mesh field (kept when vmap batches the kernel).
_KERNEL_NAME = "kernel_name" in getattr(getattr(plgpu, "Mesh", None), "__dataclass_fields__", {})
# JAX 0.11 moved ``load``'s index into the ref (``ref.at[...]``) and warns on the old form.
_INDEX_ARG = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11)


def _compiler_params():
    return plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Lane,
        # No barrier before each store: no thread reads memory it or another writes.
        unsafe_no_auto_barriers=True,
    )


def vector_len(*dtypes) -> int:
    """Elements per 16-byte access of the narrowest dtype (wider dtypes take 32 bytes)."""
    return 16 // min(jnp.dtype(d).itemsize for d in dtypes)


def rows_per_program(n: int, elems: int = ELEMS_PER_THREAD) -> int:
    """R (4, 2 or 1): as many rows as keep a thread's share of one array within elems."""
    rows = 4
    while rows > 1 and rows * n > 128 * elems:
        rows //= 2
    return rows


def _tile(rows: int, dtypes) -> int:
    """Columns of one vector tile of an R-row block: 4 // R warps of 32 lanes per row."""
    return (4 // rows) * 32 * vector_len(*dtypes)


def _fits(m: int, n: int, rows: int, dtypes, max_cols: int) -> bool:
    """N whole vector tiles of an R-row block, at most max_cols, M >= R."""
    return UNAVAILABLE is None and n % _tile(rows, dtypes) == 0 and n <= max_cols and m >= rows


def row_vector(n: int, rows: int, *dtypes) -> int:
    """Elements per access of the row kernels' loads and stores (R rows of N columns in one
    warpgroup's registers): 16 bytes of the narrowest dtype where N is whole tiles of those,
    else the widest power-of-two fewer (down to one element) that tiles N; 0 where N is not
    even whole 32-lane tiles of single elements."""
    vec = vector_len(*dtypes)
    while vec and n % ((4 // rows) * 32 * vec):
        vec //= 2
    return vec


def wide(n: int) -> bool:
    """Whether an N-column forward runs the two-walk kernel."""
    return n > MAX_COLS


def wide_bwd(n: int) -> bool:
    """Whether an N-column backward runs the two-walk kernel."""
    return n > BWD_MAX_COLS


def supported(m: int, n: int, *dtypes) -> bool:
    """Whether these kernels serve an (M, N) forward with inputs/outputs of ``dtypes``."""
    if fwd_groups(n, *dtypes):
        return _fits(m, n, GROUP_ROWS, dtypes, WIDE_MAX_COLS)
    if wide(n):
        return WIDE_CHUNK % _tile(WIDE_ROWS, dtypes) == 0 and _fits(
            m, n, WIDE_ROWS, dtypes, WIDE_MAX_COLS
        )
    rows = rows_per_program(n)  # the row kernel, its loads narrowed where N needs it
    return UNAVAILABLE is None and m >= rows and row_vector(n, rows, *dtypes) > 0


def supported_bwd(m: int, n: int, *dtypes) -> bool:
    """Whether these kernels serve an (M, N) backward with inputs/outputs of ``dtypes``
    (its rows span the four warps: N a multiple of 128 vectors)."""
    if bwd_groups(n, *dtypes):
        return _fits(m, n, 1, dtypes, WIDE_MAX_COLS)
    if wide_bwd(n):
        return BWD_CHUNK % _tile(1, dtypes) == 0 and _fits(m, n, 1, dtypes, WIDE_MAX_COLS)
    return UNAVAILABLE is None and bwd_rows(m, n, *dtypes) > 0


def full_width(n: int, *dtypes) -> bool:
    """Whether an N-column forward that these kernels serve moves 16 bytes per access (the
    row kernel narrows its vectors where N needs it, row_vector; the others never do)."""
    return wide(n) or row_vector(n, rows_per_program(n), *dtypes) == vector_len(*dtypes)


def full_width_bwd(n: int, *dtypes) -> bool:
    """full_width for the backward."""
    return wide_bwd(n) or row_vector(n, 1, *dtypes) == vector_len(*dtypes)


def _rows_layout(rows: int, n: int, vec: int):
    """(rows, N) over one warpgroup: 4 // rows warps per row, 32 lanes of vec elements."""
    per_row = 4 // rows
    tiles = ((rows, per_row * 32 * vec), (32 * vec,), (vec,))
    if per_row == 1:
        tiles = ((rows, 32 * vec), (vec,))
    layout = _fa.TiledLayout(
        _fa.Tiling(tiles),
        warp_dims=(-4, -3) if per_row > 1 else (-3,),
        lane_dims=(-2,),
        vector_dim=-1,
        _check_canonical=False,
    ).canonicalize()
    return layout


def _weight_layout(rows: int, n: int, vec: int):
    """(N,) laid out as one row of the rows layout, the same on every warp of that row."""
    return _rows_layout(rows, n, vec).reduce((0,))


def _as_pallas_layout(layout):
    return plgpu.Layout.TILED(
        layout.tiling,
        warp_dims=layout.warp_dims,
        lane_dims=layout.lane_dims,
        vector_dim=layout.vector_dim,
    )


def _broadcast(value, shape, dims, layout):
    """value broadcast to shape (its axes at dims) in the rows layout."""
    return _cast(lax.broadcast_in_dim(value, shape, dims), layout)


def _cast(value, layout):
    """value in the register layout (as it is, in interpret mode)."""
    if _INTERPRETING.get():
        return value
    return plgpu.layout_cast(value, _as_pallas_layout(layout))


def _weight(w_ref, rows, n, vec, weight_offset):
    """The weight (+ offset) in fp32, broadcast over a block of rows (w_ref: N elements)."""
    w = _load(w_ref, _weight_layout(rows, n, vec)).astype(F32)
    if weight_offset:
        w = w + weight_offset
    return _broadcast(w, (rows, n), (1,), _rows_layout(rows, n, vec))


def _load(ref, layout):
    if _INTERPRETING.get():
        return ref[...]
    layout = _as_pallas_layout(layout)
    if _INDEX_ARG:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _launch(
    kernel,
    name: str,
    out_shape,
    programs: int,
    grid_name: str,
    scratch=(),
    groups=0,
    *,
    interpret: bool = False,
):
    """kernel as a Mosaic GPU call over a 1-D grid, named name, with scratch (shared memory
    refs, after the outputs): one warpgroup per program, or ``groups`` (axis "group");
    interpret: in Mosaic GPU's interpret mode (CPU), its race detector on. Inside shard_map
    the outputs are typed varying over the inputs' mesh axes, as check_vma needs."""
    threads = {"num_threads": groups, "thread_name": "group"} if groups else {}
    if _KERNEL_NAME:
        threads["kernel_name"] = name  # kept under vmap, which renames the body
    if interpret:
        if INTERPRET_UNAVAILABLE:
            raise ValueError(
                f"the Mosaic GPU kernels cannot run interpreted: {INTERPRET_UNAVAILABLE}"
            )
        threads["interpret"] = _InterpretParams(detect_races=True)

    def call(*inputs):
        outs = plgpu.kernel(
            _named(kernel, name, interpret),
            out_type=out_shape,
            scratch_types=scratch,
            grid=(programs,),
            grid_names=(grid_name,),
            compiler_params=_compiler_params(),
            **threads,
        )(*inputs)
        return _typed_varying(outs, inputs)

    return call


def _typed_varying(outs, inputs):
    """outs typed varying over the inputs' manual mesh axes (inside shard_map, where
    check_vma needs them; Mosaic GPU types a kernel's outputs invariant whatever its
    out_type says). A change of type only, never differentiated: the ops' custom_vjp and
    custom_jvp rules stand in for the kernels' derivatives."""
    varying = varying_axes(inputs)

    def cast(o):
        missing = tuple(sorted(varying - varying_axes([o])))
        return jax.lax.pcast(o, missing, to="varying") if missing else o

    return jax.tree.map(cast, outs) if varying else outs


def _named(kernel, name: str, interpret: bool = False):
    """kernel under a function name (Mosaic GPU names the kernel after it), traced for
    interpret mode where asked (each time it is traced: vmap traces it again)."""

    def body(*refs):
        token = _INTERPRETING.set(interpret)
        try:
            kernel(*refs)
        finally:
            _INTERPRETING.reset(token)

    body.__name__ = body.__qualname__ = name
    return body


def _input_block(x_ref, res_ref, h_ref, at, layout, round_dtype, has_residual, store_h):
    """Rows ``at`` of x, or of h = round(x + residual) (stored when store_h), in fp32."""
    x = _load(x_ref.at[at], layout)
    if has_residual:
        h = (x.astype(F32) + _load(res_ref.at[at], layout).astype(F32)).astype(round_dtype)
        if store_h:
            h_ref[at] = h
        x = h
    return x.astype(F32)


def _fwd_kernel(
    *refs,
    m,
    n,
    rows,
    vec,
    eps,
    weight_offset,
    llama,
    round_dtype,
    has_residual,
    has_weight,
    store_h,
    store_rstd,
):
    x_ref, res_ref, w_ref, y_ref, h_ref, rstd_ref = fwd_refs(
        refs, has_residual, has_weight, store_h, store_rstd
    )

    layout = _rows_layout(rows, n, vec)
    at = pl.ds(jnp.minimum(lax.axis_index("rows") * rows, m - rows), rows)
    x = _input_block(x_ref, res_ref, h_ref, at, layout, round_dtype, has_residual, store_h)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / n + eps)
    if store_rstd:
        rstd_ref[at] = rstd
    r = _broadcast(rstd, (rows, n), (0,), layout)
    if has_weight:
        w = _weight(w_ref, rows, n, vec, weight_offset)
        if llama:
            y = (x * r).astype(round_dtype).astype(F32) * w
        else:
            y = x * (r * w)
    else:
        y = x * r
    y_ref[at] = y.astype(y_ref.dtype)


def rmsnorm_fwd(
    x,
    residual,
    weight,
    *,
    eps: float,
    weight_offset: float,
    llama: bool,
    out_dtype,
    round_dtype,
    store_h: bool,
    store_rstd: bool,
    interpret: bool = False,
):
    """Forward kernel, plain or fused residual-add (the signature of kernels.rmsnorm_fwd;
    interpret: Mosaic GPU's interpret mode, on the CPU).

    x: (M, N) fp32/fp16/bf16 with ``supported(M, N, ...)``. residual: None or (M, N).
    weight: None or (N,). Returns (y (M, N) out_dtype, h (M, N) round_dtype or None,
    rstd (M,) fp32 or None).
    """
    m, n = x.shape
    has_residual = residual is not None
    store_h = store_h and has_residual
    inputs = [a for a in (x, residual, weight) if a is not None]
    dtypes = [a.dtype for a in inputs] + [out_dtype] + ([round_dtype] if has_residual else [])
    if not supported(m, n, *dtypes):
        raise ValueError(f"the Mosaic GPU forward does not serve {(m, n)} with dtypes {dtypes}")
    rows, body, extra, scratch = rows_per_program(n), _fwd_kernel, {}, ()
    vec = vector_len(*dtypes)
    out_shape = fwd_out_shape(m, n, out_dtype, round_dtype, store_h, store_rstd)
    groups = fwd_groups(n, *dtypes)
    if groups:
        rows, body, extra = GROUP_ROWS, _fwd_grouped_kernel, {"groups": groups}
        scratch, segments = _exchange_scratch(groups, rows), 4 * groups // rows
        inputs = _segment_view(inputs, weight, segments)
        out_shape = _segment_view(out_shape, None, segments)
    elif wide(n):
        rows, body, extra = WIDE_ROWS, _fwd_wide_kernel, {"chunk": WIDE_CHUNK}
    else:
        vec = row_vector(n, rows, *dtypes)
    kernel = functools.partial(
        body,
        **extra,
        m=m,
        n=n,
        rows=rows,
        vec=vec,
        eps=eps,
        weight_offset=weight_offset,
        llama=llama,
        round_dtype=round_dtype,
        has_residual=has_residual,
        has_weight=weight is not None,
        store_h=store_h,
        store_rstd=store_rstd,
    )
    name = "rmsnorm_residual_fwd_mgpu" if has_residual else "rmsnorm_fwd_mgpu"
    programs = pl.cdiv(m, rows)
    launch = _launch(
        kernel, name, out_shape, programs, "rows", scratch, groups, interpret=interpret
    )
    outs = launch(*inputs)
    if groups:
        outs = [o.reshape(m, n) if o.ndim == 2 else o for o in outs]
    return fwd_outputs(outs, store_h, store_rstd)


# ---------------------------------------------------------------------------- backward


def _bwd_load(refs, at, layout):
    """Rows ``at``'s x, dy (in their dtypes) and rstd (the loads a backward step waits on)."""
    dy_ref, x_ref, rstd_ref = refs[:3]
    return (
        _load(x_ref.at[at], layout),
        _load(dy_ref.at[at], layout),
        _load(rstd_ref.at[at], layout.reduce((1,))),
    )


def _bwd_row(refs, at, loaded, w, acc, *, layout, has_dh, store_dres):
    """Rows ``at`` (a block of R) of the backward from their loaded x, dy, rstd: dx (and dres)
    stored; acc + dy * xhat returned (acc None: no weight)."""
    x, dy = (a.astype(F32) for a in loaded[:2])
    shape = x.shape
    rstd = _broadcast(loaded[2], shape, (0,), layout)
    g = dy if w is None else dy * w
    mean_gx = _broadcast(jnp.sum(g * x, axis=1) / shape[1], shape, (0,), layout) * rstd
    xhat = _store_dx(refs, at, x, g, rstd, mean_gx, layout, has_dh, store_dres)
    return None if acc is None else acc + dy * xhat


def _store_dx(refs, at, x, g, rstd, mean_gx, layout, has_dh, store_dres):
    """dx = rstd * (g - xhat * mean_gx) (+ dh) stored at rows ``at`` (and dres); xhat
    returned. mean_gx is mean(g * x) * rstd, both broadcast over the block."""
    _, _, _, _, dh_ref, dx_ref, dres_ref, _ = refs
    xhat = x * rstd
    dx = rstd * (g - xhat * mean_gx)
    if has_dh:
        dx = dx + _load(dh_ref.at[at], layout).astype(F32)
    dx_ref[at] = dx.astype(dx_ref.dtype)
    if store_dres:
        dres_ref[at] = dx.astype(dres_ref.dtype)
    return xhat


def _bwd_kernel(*refs, m, n, rows, vec, programs, weight_offset, has_weight, **row_args):
    """Backward program pid over blocks of R rows (R = 1 where N allows; M a multiple of R):
    blocks pid, pid + G, ..., each block's loads issued BWD_PREFETCH blocks ahead (a loop
    carry: they are in flight while earlier blocks reduce and store); dweight's dy * xhat
    summed in registers and written to rows pid * R ... of the (G * R, N) partials."""
    refs = bwd_refs(refs, has_weight, row_args["has_dh"], row_args["store_dres"], has_weight)
    layout = _rows_layout(rows, n, vec)
    pid = lax.axis_index("programs")
    w = _weight(refs[3], rows, n, vec, weight_offset) if has_weight else None
    ahead = BWD_PREFETCH
    blocks = m // rows

    def block(b):
        return pl.ds(b * rows if rows > 1 else b, rows)

    def load(i):
        # past the program's last block: a block read again and never used
        return _bwd_load(refs, block(jnp.minimum(pid + i * programs, blocks - 1)), layout)

    def step(i, carry):
        acc, loaded = carry
        loaded = (*loaded, load(i + ahead))
        at = block(pid + i * programs)
        acc = _bwd_row(refs, at, loaded[0], w, acc, layout=layout, **row_args)
        return acc, loaded[1:]

    acc = _cast(jnp.zeros((rows, n), F32), layout)
    carry = (acc if has_weight else None, tuple(load(i) for i in range(ahead)))
    acc, _ = lax.fori_loop(0, (blocks - pid + programs - 1) // programs, step, carry)
    if has_weight:
        refs[-1][block(pid)] = acc


def bwd_rows(m: int, n: int, *dtypes) -> int:
    """R, the rows of a block of the backward's row kernel: 1 where N is whole 128-lane
    tiles of (possibly narrowed) loads; else 2 or 4 (two warps or one per row, N whole 64-
    or 32-lane tiles) where M is a multiple of R and a thread's share of a block is no more
    than of one row at BWD_MAX_COLS (R * N <= BWD_MAX_COLS); 0 where none fits."""
    for rows in (1, 2, 4):
        fits = rows * n <= BWD_MAX_COLS and m % rows == 0 and m >= rows
        if fits and row_vector(n, rows, *dtypes):
            return rows
    return 0


def bwd_programs(m: int, n: int, groups: int = 0, rows: int = 1) -> int:
    """G, the backward's programs (each writes R rows of dweight partials); groups:
    bwd_groups; rows: bwd_rows (blocks of R rows, M / R of them)."""
    if groups:
        return max(1, min(m, BWD_GROUP_PROGRAMS))
    twice = n <= BWD_NARROW_COLS or (wide_bwd(n) and n <= BWD_WIDE_SMALL_COLS)
    cap = BWD_MAX_PROGRAMS * (2 if twice else 1)
    return max(1, min(m // rows, cap))


def rmsnorm_bwd(
    dy, x, rstd, weight, dh, *, weight_offset: float, dx_dtype, dres_dtype, interpret=False
):
    """Backward kernel (the signature of kernels.rmsnorm_bwd), dweight's (G, N) fp32
    partials summed by XLA, in the same order every run; interpret: Mosaic GPU's interpret
    mode, on the CPU.

    dy: (M, N) cotangent of y. x: (M, N) the normalized input (x, or h when fused), with
    ``supported_bwd(M, N, ...)``. rstd: (M,) fp32. weight: None or (N,). dh: None or (M, N)
    cotangent of h, added to dx. dres_dtype: None or a second dtype for the same gradient.
    Returns (dx (M, N) dx_dtype, dres or None, dweight (N,) in weight's dtype or None).
    """
    m, n = x.shape
    has_weight, has_dh, store_dres = weight is not None, dh is not None, dres_dtype is not None
    inputs = [a for a in (dy, x, rstd, weight, dh) if a is not None]
    dtypes = [a.dtype for a in inputs if a is not rstd] + [dx_dtype]
    dtypes += [dres_dtype] if store_dres else []
    if not supported_bwd(m, n, *dtypes):
        raise ValueError(f"the Mosaic GPU backward does not serve {(m, n)} with dtypes {dtypes}")
    groups = bwd_groups(n, *dtypes)
    rows, vec = 1, vector_len(*dtypes)
    if not wide_bwd(n):  # the row kernel, its loads narrowed where N needs it
        rows = bwd_rows(m, n, *dtypes)
        vec = row_vector(n, rows, *dtypes)
    programs = bwd_programs(m, n, groups, rows)
    out_shape = [jax.ShapeDtypeStruct((m, n), dx_dtype)]
    out_shape += [jax.ShapeDtypeStruct((m, n), dres_dtype)] if store_dres else []
    out_shape += [jax.ShapeDtypeStruct((programs * rows, n), F32)] if has_weight else []
    body, extra, scratch, view = _bwd_kernel, {"rows": rows}, (), (m, n)
    if groups:
        body, extra, scratch = _bwd_grouped_kernel, {"groups": groups}, _exchange_scratch(groups)
        inputs = _segment_view(inputs, weight, 4 * groups)
        out_shape = _segment_view(out_shape, None, 4 * groups)
    elif wide_bwd(n):
        chunk = bwd_chunk(n, *dtypes)
        body, extra, view = _bwd_wide_kernel, {"chunk": chunk}, (m * n // chunk, chunk)
        scratch = (plgpu.SMEM((n // chunk, chunk), F32),) if has_weight else ()
        inputs = [a if a.shape != (m, n) else a.reshape(view) for a in inputs]
        out_shape = [
            jax.ShapeDtypeStruct((s.shape[0] * n // chunk, chunk), s.dtype) for s in out_shape
        ]
    kernel = functools.partial(
        body,
        **extra,
        m=m,
        n=n,
        vec=vec,
        programs=programs,
        weight_offset=weight_offset,
        has_weight=has_weight,
        has_dh=has_dh,
        store_dres=store_dres,
    )
    name = "rmsnorm_bwd_mgpu"
    launch = _launch(
        kernel, name, out_shape, programs, "programs", scratch, groups, interpret=interpret
    )
    outs = list(launch(*inputs))
    if has_weight:
        dweight = jnp.sum(outs.pop().reshape(-1, n), axis=0).astype(weight.dtype)
    else:
        dweight = None
    outs = [o.reshape(m, n) for o in outs]
    return outs[0], (outs[1] if store_dres else None), dweight


# ------------------------------------------------------------------ rows past MAX_COLS
#
# Rows wider than a program's registers are walked in column chunks, twice: the first walk
# sums the row's squares (or g * x), the second reloads each chunk (from L1 or L2, just read)
# and writes it. The backward's dweight accumulator (one fp32 row) lives in shared memory,
# each thread adding to the elements it alone owns.


def col_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, size)] covering N in chunk-wide pieces, the last one possibly narrower."""
    return [(c, min(chunk, n - c)) for c in range(0, n, chunk)]


def _row_sum(parts):
    """The per-row sum of (rows, size) fp32 pieces: same-size pieces added elementwise
    first, so the cross-lane reduction runs once per size."""
    by_size = {}
    for p in parts:
        by_size[p.shape[1]] = p if p.shape[1] not in by_size else by_size[p.shape[1]] + p
    sums = [jnp.sum(p, axis=1) for p in by_size.values()]
    return functools.reduce(jnp.add, sums)


def _fwd_wide_kernel(*refs, m, n, rows, chunk, vec, eps, weight_offset, llama, round_dtype,
                     has_residual, has_weight, store_h, store_rstd):  # fmt: skip
    """Forward program over R rows in two walks over the column chunks (_fwd_kernel's
    arguments, plus chunk)."""
    x_ref, res_ref, w_ref, y_ref, h_ref, rstd_ref = fwd_refs(
        refs, has_residual, has_weight, store_h, store_rstd
    )

    layout = _rows_layout(rows, chunk, vec)
    at = pl.ds(jnp.minimum(lax.axis_index("rows") * rows, m - rows), rows)

    def h_of(c, size, store):
        # the second walk adds x + residual again (same bits) rather than reading back h
        x = _load(x_ref.at[at, pl.ds(c, size)], layout)
        if has_residual:
            r = _load(res_ref.at[at, pl.ds(c, size)], layout)
            x = (x.astype(F32) + r.astype(F32)).astype(round_dtype)
            if store:
                h_ref[at, pl.ds(c, size)] = x
        return x.astype(F32)

    chunks = col_chunks(n, chunk)
    squares = []
    for c, size in chunks:
        x = h_of(c, size, store_h)
        squares.append(x * x)
    rstd = lax.rsqrt(_row_sum(squares) / n + eps)
    if store_rstd:
        rstd_ref[at] = rstd
    for c, size in chunks:
        x = h_of(c, size, False)
        r = _broadcast(rstd, (rows, size), (0,), layout)
        if has_weight:
            w = _weight(w_ref.at[pl.ds(c, size)], rows, size, vec, weight_offset)
            y = (x * r).astype(round_dtype).astype(F32) * w if llama else x * (r * w)
        else:
            y = x * r
        y_ref[at, pl.ds(c, size)] = y.astype(y_ref.dtype)


def bwd_chunk(n: int, *dtypes) -> int:
    """The wide backward's chunk: the widest multiple of a row's vector tile that divides N
    and is at most BWD_SMALL_CHUNK (N up to BWD_WIDE_SMALL_COLS) or BWD_CHUNK."""
    tile = _tile(1, dtypes)
    most = BWD_SMALL_CHUNK if n <= BWD_WIDE_SMALL_COLS else BWD_CHUNK
    return max(c for c in range(tile, min(n, most) + 1, tile) if n % c == 0)


def _bwd_wide_kernel(*refs, m, n, chunk, vec, programs, weight_offset, has_weight, has_dh,
                     store_dres):  # fmt: skip
    """Backward program pid over rows pid, pid + G, ...: per row, a walk over the column
    chunks for sum(g * x), a second for dx and dweight's dy * xhat (added into the program's
    fp32 accumulator row in shared memory, copied to row pid of the partials at the end).

    The (M, N) arrays come as (M * Q, C) (Q = N / C chunks of C columns: a chunk is one whole
    row of that view, which Mosaic GPU loads as one contiguous block), the partials as
    (G * Q, C) and the accumulator as (Q, C)."""
    refs = list(refs)
    acc_ref = refs.pop() if has_weight else None
    refs = bwd_refs(refs, has_weight, has_dh, store_dres, has_weight)
    dy_ref, x_ref, rstd_ref, w_ref, dwp_ref = refs[0], refs[1], refs[2], refs[3], refs[7]
    layout = _rows_layout(1, chunk, vec)
    pid = lax.axis_index("programs")
    q = n // chunk

    if has_weight:
        for j in range(q):
            acc_ref[pl.ds(j, 1)] = _cast(jnp.zeros((1, chunk), F32), layout)

    def loaded(r, j):
        at = pl.ds(r * q + j, 1)
        x = _load(x_ref.at[at], layout).astype(F32)
        dy = _load(dy_ref.at[at], layout).astype(F32)
        if has_weight:
            w = _weight(w_ref.at[pl.ds(j * chunk, chunk)], 1, chunk, vec, weight_offset)
            return x, dy, dy * w
        return x, dy, dy

    def row(i, carry):
        r = pid + i * programs
        rstd = _load(rstd_ref.at[pl.ds(r, 1)], layout.reduce((1,)))
        gx = None
        for j in range(q):
            x, _, g = loaded(r, j)
            gx = g * x if gx is None else gx + g * x
        rstd = _broadcast(rstd, (1, chunk), (0,), layout)
        mean_gx = _broadcast(jnp.sum(gx, axis=1) / n, (1, chunk), (0,), layout) * rstd
        for j in range(q):
            x, dy, g = loaded(r, j)
            at = pl.ds(r * q + j, 1)
            xhat = _store_dx(refs, at, x, g, rstd, mean_gx, layout, has_dh, store_dres)
            if has_weight:
                acc_ref[pl.ds(j, 1)] = _load(acc_ref.at[pl.ds(j, 1)], layout) + dy * xhat
        return carry

    lax.fori_loop(0, (m - pid + programs - 1) // programs, row, 0)
    if has_weight:
        for j in range(q):
            dwp_ref[pl.ds(pid * q + j, 1)] = _load(acc_ref.at[pl.ds(j, 1)], layout)


# ------------------------------------------------------ rows past MAX_COLS, in warpgroups
#
# A program of W warpgroups: each warp holds one contiguous segment of a row (N / S columns,
# S = 4 W / R segments per row), so a warp's sum never crosses warps (Mosaic GPU's
# cross-warp reduction uses one shared scratch buffer for the whole program, which
# warpgroups running side by side would race on). The segment sums meet in shared memory:
# every warp writes its part, all wait on one barrier, and each thread adds its row's parts
# in the same order (the same bits in every warpgroup of the row). The (M, N) arrays travel
# as (M * S, N / S): the four segments of a warpgroup are four contiguous rows of that view.


def _split(n: int, rows: int, dtypes, elems: int) -> int:
    """W, the fewest warpgroups (at most MAX_GROUPS, a multiple of R) over which R rows of
    N columns split into segments of whole vector tiles of at most 32 * elems columns (a
    thread's share of one array at most elems); 0 if none."""
    tile = _tile(4, dtypes)
    for groups in range(rows, MAX_GROUPS + 1, rows):
        seg, rest = divmod(n * rows, 4 * groups)
        if not rest and seg % tile == 0 and n % seg == 0 and seg <= 32 * elems:
            return groups
    return 0


def fwd_groups(n: int, *dtypes) -> int:
    """W, the warpgroups of a forward program of GROUP_ROWS rows past MAX_COLS (_split at
    GROUP_ELEMS); 0 where these rows take another kernel."""
    return _split(n, GROUP_ROWS, dtypes, GROUP_ELEMS) if GROUPED and wide(n) else 0


def bwd_groups(n: int, *dtypes) -> int:
    """W, the warpgroups of a backward program past BWD_MAX_COLS up to BWD_GROUP_MAX_COLS
    (one row at a time, _split at BWD_GROUP_ELEMS); 0 where these rows take another
    kernel."""
    if not (GROUPED and wide_bwd(n) and n <= BWD_GROUP_MAX_COLS):
        return 0
    return _split(n, 1, dtypes, BWD_GROUP_ELEMS)


def _segment_view(arrays, weight, segments: int):
    """The (rows, N) arrays (and ShapeDtypeStructs) as (rows * S, N / S), S = segments, and
    the weight as (S, N / S); the others as they are."""

    def view(a):
        shape = a.shape
        if a is weight:
            shape = (segments, shape[0] // segments)
        elif len(shape) == 2:
            shape = (shape[0] * segments, shape[1] // segments)
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(shape, a.dtype)
        return a.reshape(shape)

    return [view(a) for a in arrays]


def _exchange_scratch(groups: int, rows: int = 0):
    """Shared memory for the segment sums of W warpgroups (EXCHANGE_BUFFERS buffers, used in
    turn by consecutive rows), R fp32 rstd to store (rows > 0), and the barrier all threads
    arrive at."""
    rstd = (plgpu.SMEM((rows,), F32),) if rows else ()
    return (
        plgpu.SMEM((EXCHANGE_BUFFERS, groups, 4), F32),
        *rstd,
        plgpu.Barrier(num_arrivals=groups),
    )


def _row_total(parts_ref, first: int, count: int):
    """The sum of the segment parts of warpgroups first .. first + count - 1 (scalars, in
    warpgroup then warp order)."""
    total = None
    for i in range(count):
        for warp in range(4):
            part = parts_ref[first + i, warp]
            total = part if total is None else total + part
    return total


def _meet(parts_ref, barrier, part):
    """Write this warpgroup's (4,) segment parts to parts_ref (one buffer) and wait until
    every warpgroup has written its own."""
    parts_ref[lax.axis_index("group")] = part
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _segment_weight(w_ref, at, layout, weight_offset):
    """This warpgroup's four weight segments (rows ``at`` of the (S, N / S) weight) + offset
    in fp32."""
    w = _load(w_ref.at[at], layout).astype(F32)
    return w + weight_offset if weight_offset else w


def _fwd_grouped_kernel(*refs, m, n, rows, groups, vec, eps, weight_offset, llama,
                        round_dtype, has_residual, has_weight, store_h, store_rstd):  # fmt: skip
    """Forward program over R rows in W warpgroups, W / R per row (_fwd_kernel's arguments,
    plus groups; the (M, N) arrays in the segment view)."""
    parts_ref, rstd_smem, barrier = refs[-3:]
    x_ref, res_ref, w_ref, y_ref, h_ref, rstd_ref = fwd_refs(
        refs[:-3], has_residual, has_weight, store_h, store_rstd
    )
    per_row = groups // rows
    segments = 4 * per_row
    layout = _rows_layout(4, n // segments, vec)
    group = lax.axis_index("group")
    first = jnp.minimum(lax.axis_index("rows") * rows, m - rows)
    at = pl.ds(first * segments + 4 * group, 4)
    x = _input_block(x_ref, res_ref, h_ref, at, layout, round_dtype, has_residual, store_h)
    parts_ref = parts_ref.at[0]
    _meet(parts_ref, barrier, jnp.sum(x * x, axis=1))

    def rstd_of(row):
        return lax.rsqrt(_row_total(parts_ref, row * per_row, per_row) / n + eps)

    if store_rstd:
        # Warpgroup 0 stores the program's R rstd as one vector: every one of its threads
        # writes all R to rstd_smem and reads back what it wrote itself (no barrier needed).
        @pl.when(group == 0)
        def _():
            for row in range(rows):
                rstd_smem[row] = rstd_of(row)
            rstd_ref[pl.ds(first, rows)] = _load(rstd_smem, _rows_layout(rows, n, vec).reduce((1,)))

    rstd = _broadcast(rstd_of(group // per_row), x.shape, (), layout)
    if has_weight:
        w = _segment_weight(w_ref, pl.ds(group % per_row * 4, 4), layout, weight_offset)
        y = (x * rstd).astype(round_dtype).astype(F32) * w if llama else x * (rstd * w)
    else:
        y = x * rstd
    y_ref[at] = y.astype(y_ref.dtype)


def _bwd_grouped_kernel(*refs, m, n, vec, programs, groups, weight_offset, has_weight, has_dh,
                        store_dres):  # fmt: skip
    """Backward program pid over rows pid, pid + G, ... in W warpgroups, each holding a
    quarter of its W-th of every row (the arrays in the segment view, S = 4 W; the
    partials as (G * S, N / S)); the next BWD_PREFETCH rows' loads in flight, as in
    _bwd_kernel, and dweight's dy * xhat summed in registers."""
    parts_ref, barrier = refs[-2:]
    refs = bwd_refs(refs[:-2], has_weight, has_dh, store_dres, has_weight)
    dy_ref, x_ref, rstd_ref = refs[:3]
    segments = 4 * groups
    layout = _rows_layout(4, n // segments, vec)
    group, pid = lax.axis_index("group"), lax.axis_index("programs")

    def block(r):
        return pl.ds(r * segments + 4 * group, 4)

    w = None
    if has_weight:
        w = _segment_weight(refs[3], pl.ds(4 * group, 4), layout, weight_offset)

    def load(i):
        r = jnp.minimum(pid + i * programs, m - 1)  # past the last row: read, never used
        return _load(x_ref.at[block(r)], layout), _load(dy_ref.at[block(r)], layout), rstd_ref[r]

    def step(i, carry):
        acc, loaded = carry
        loaded = (*loaded, load(i + BWD_PREFETCH))
        x, dy = (a.astype(F32) for a in loaded[0][:2])
        g = dy if w is None else dy * w
        parts = parts_ref.at[i % EXCHANGE_BUFFERS]
        _meet(parts, barrier, jnp.sum(g * x, axis=1))
        rstd = _broadcast(loaded[0][2], x.shape, (), layout)
        mean_gx = _broadcast(_row_total(parts, 0, groups) / n, x.shape, (), layout) * rstd
        r = pid + i * programs
        xhat = _store_dx(refs, block(r), x, g, rstd, mean_gx, layout, has_dh, store_dres)
        return (None if acc is None else acc + dy * xhat), loaded[1:]

    acc = _cast(jnp.zeros((4, n // segments), F32), layout)
    carry = (acc if has_weight else None, tuple(load(i) for i in range(BWD_PREFETCH)))
    acc, _ = lax.fori_loop(0, (m - pid + programs - 1) // programs, step, carry)
    if has_weight:
        refs[-1][block(pid)] = acc


__all__ = [
    "BWD_GROUP_MAX_COLS",
    "BWD_MAX_COLS",
    "MAX_COLS",
    "WIDE_MAX_COLS",
    "UNAVAILABLE",
    "bwd_chunk",
    "bwd_groups",
    "bwd_programs",
    "bwd_rows",
    "col_chunks",
    "full_width",
    "full_width_bwd",
    "fwd_groups",
    "rmsnorm_bwd",
    "rmsnorm_fwd",
    "row_vector",
    "rows_per_program",
    "supported",
    "supported_bwd",
    "wide",
    "wide_bwd",
]
