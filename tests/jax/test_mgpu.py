"""The Mosaic GPU forward on this CPU machine: which shapes it serves, which backend each
call gets, and that every kernel variant lowers for CUDA (``jax.export`` runs the
Pallas-to-Mosaic-GPU lowering without a GPU). Its values are checked in
tests/jax/test_mgpu_values.py (interpreted here, compiled on the GPU), and here that the
interpreter's race detector sees a race planted in the kernels."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import accel_jax
from accel_jax import backends, kernels, kernels_mgpu, ops
from tests.jax.test_transforms import _jaxlib_lowers_without_compiling

pytestmark = pytest.mark.skipif(
    kernels_mgpu.UNAVAILABLE is not None, reason="this JAX has no Pallas Mosaic GPU"
)
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize(
    "m, n, dtypes, served",
    [
        ((4, 256, [BF16], True)),
        ((3, 256, [BF16], False)),  # fewer rows than one program's
        ((4096, 4096, [BF16, F32], True)),
        ((4096, 3584, [BF16], True)),  # 14 vectors of 256
        ((4096, 3584, [F32], True)),  # fp32 vectors: 128 columns
        ((4096, 1000, [BF16], False)),  # not whole 32-column tiles
        ((4096, 2880, [BF16], True)),  # not whole 256-column tiles: 4-byte loads
        ((8, 128, [BF16], True)),  # a head's width: 8-byte loads
        ((8, 96, [F32], True)),  # 4-byte loads
        ((4096, 4160, [F32], True)),  # two rows per program, 4-byte loads
        ((4096, 4176, [F32], False)),  # not whole 64-column tiles
        ((2, 8192, [BF16], True)),  # two rows per program
        ((4096, 4352, [BF16], True)),  # two rows per program: N not whole 512-column tiles
        ((1, 8192, [BF16], False)),
        ((64, 16384, [BF16], True)),  # past MAX_COLS: two warpgroups per row
        ((2, 12288, [F32], True)),
        ((64, 16896, [BF16], True)),  # no split into whole segments: column chunks
        ((64, 16640, [BF16], False)),  # not whole 512-column tiles
        ((1, 16384, [BF16], False)),  # fewer rows than one program's
        ((64, 16 * 4096 + 512, [BF16], False)),  # past WIDE_MAX_COLS
    ],
)
def test_supported_shapes(m, n, dtypes, served):
    assert kernels_mgpu.supported(m, n, *dtypes) is served


@pytest.mark.parametrize(
    "m, n, dtypes, served",
    [
        ((3, 5120, [BF16], True)),
        ((3, 7168, [BF16], True)),  # past BWD_MAX_COLS: seven warpgroups
        ((3, 9216, [BF16], True)),  # no split into whole segments: column chunks
        ((3, 6656, [BF16], False)),  # not whole 1024-column tiles
        ((3, 3584, [BF16], True)),  # up to BWD_MAX_COLS: 8-byte loads
        ((3, 896, [BF16], True)),  # 2-byte loads
        ((3, 2880, [BF16], False)),  # not whole 128-column tiles
        ((4, 576, [BF16], True)),  # whole 64-column tiles: blocks of two rows
        ((3, 576, [BF16], False)),  # rows not a multiple of two
        ((8, 96, [F32], True)),  # whole 32-column tiles: blocks of four rows
        ((6, 96, [F32], False)),  # rows not a multiple of four
        ((4, 2880, [BF16], False)),  # two rows of 2880 > BWD_MAX_COLS
        ((3, 6656, [F32], True)),  # fp32 tiles: 512 columns
        ((1, 16384, [BF16], True)),
        ((1, 16 * 4096 + 1024, [BF16], False)),  # past WIDE_MAX_COLS
    ],
)
def test_supported_backward_shapes(m, n, dtypes, served):
    assert kernels_mgpu.supported_bwd(m, n, *dtypes) is served


def test_column_chunks_cover_the_row():
    assert kernels_mgpu.col_chunks(16896, 4096) == [
        (0, 4096), (4096, 4096), (8192, 4096), (12288, 4096), (16384, 512)
    ]  # fmt: skip
    assert kernels_mgpu.col_chunks(8192, 4096) == [(0, 4096), (4096, 4096)]
    # the backward's chunk divides N: the widest multiple of its 1024-column (bf16) or
    # 512-column (fp32) tile up to 2048 (N <= 8192) or 4096
    assert kernels_mgpu.bwd_chunk(16384, BF16) == 4096
    assert kernels_mgpu.bwd_chunk(9216, BF16) == 3072
    assert kernels_mgpu.bwd_chunk(8192, BF16) == 2048
    assert kernels_mgpu.bwd_chunk(7168, BF16) == 1024
    assert kernels_mgpu.bwd_chunk(6656, F32) == 512
    assert kernels_mgpu.bwd_chunk(6144, F32) == 2048
    # and its programs: twice as many up to 8192 columns
    assert kernels_mgpu.bwd_programs(4096, 8192) == 2 * kernels_mgpu.BWD_MAX_PROGRAMS
    assert kernels_mgpu.bwd_programs(4096, 9216) == kernels_mgpu.BWD_MAX_PROGRAMS


def test_rows_past_max_cols_split_over_warpgroups():
    """W warpgroups hold R rows as 4 W segments of whole 16-byte vector tiles (256 bf16 or
    128 fp32 columns per warp), at most 32 * GROUP_ELEMS (forward, R = GROUP_ROWS = 2) or
    32 * BWD_GROUP_ELEMS (backward, R = 1) columns each; 0: the two-walk kernel."""
    assert (kernels_mgpu.GROUP_ROWS, kernels_mgpu.GROUP_ELEMS) == (2, 128)
    assert kernels_mgpu.BWD_GROUP_ELEMS == 16
    # forward: two rows of 16384 as four 8192-column halves (2 warpgroups, 4096-column
    # segments); 32768 in 4 warpgroups; 16896 / 8 = 2112 is no whole number of tiles
    for n, groups in [(9216, 2), (12288, 2), (16384, 2), (32768, 4), (16896, 0), (8192, 0)]:
        assert kernels_mgpu.fwd_groups(n, BF16) == groups, n
    assert kernels_mgpu.fwd_groups(12288, F32) == 2
    # backward: 512-column segments at most; 7168 = 28 segments of 256 (7 warpgroups);
    # 9216 splits into no 4 W segments of whole tiles up to 8 warpgroups; none past 12288
    for n, groups in [(6144, 3), (7168, 7), (8192, 4), (12288, 6), (9216, 0), (16384, 0)]:
        assert kernels_mgpu.bwd_groups(n, BF16) == groups, n
    assert kernels_mgpu.bwd_groups(5120, BF16) == 0  # one warpgroup holds the row
    assert kernels_mgpu.bwd_groups(6656, F32) == 0  # 6656 / 4 = 13 tiles of 128: 13 groups


def test_rows_per_program_keeps_a_threads_share():
    for n in (256, 4096, 5120, 8192):
        rows = kernels_mgpu.rows_per_program(n)
        assert rows in (1, 2, 4)
        assert rows * n <= 128 * kernels_mgpu.ELEMS_PER_THREAD
        assert rows == 4 or 2 * rows * n > 128 * kernels_mgpu.ELEMS_PER_THREAD


@pytest.mark.parametrize(
    "setting, m, fused, hopper, expected",
    [
        ("auto", 4096, True, True, kernels_mgpu),
        ("auto", 4096, False, True, kernels),  # plain forward at 4096 columns: Triton
        ("auto", 256, True, True, kernels),  # few rows: Triton was faster
        ("auto", 4096, True, False, kernels),  # before Hopper
        ("triton", 4096, True, True, kernels),
        ("mosaic_gpu", 256, False, False, kernels_mgpu),
        ("reference", 4096, True, True, kernels),
        ("", 4096, True, True, kernels_mgpu),  # empty means auto
    ],
)
def test_forward_backend_choice(monkeypatch, setting, m, fused, hopper, expected):
    monkeypatch.setenv("ACCEL_JAX_BACKEND", setting)
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: hopper)
    choice = backends.backend()
    assert backends.forward_kernels(m, 4096, fused, [BF16], choice) is expected
    # a shape Mosaic GPU does not serve always gets the Triton-lowered kernels
    assert backends.forward_kernels(m, 1000, fused, [BF16], choice) is kernels


@pytest.mark.parametrize(
    "m, n, hopper, expected",
    [
        (4096, 4608, True, kernels_mgpu),
        (4096, 5120, True, kernels_mgpu),
        (4096, 7168, True, kernels_mgpu),
        (8192, 6144, True, kernels_mgpu),
        (2048, 5120, True, kernels),  # below MGPU_FWD_MIN_ELEMS: not measured faster
        (4096, 3584, True, kernels),  # 3072-3584 columns: Triton was faster
        (8192, 4096, True, kernels),  # a tie at 4096 and 8192 columns
        (4096, 8192, True, kernels),
        (4096, 5120, False, kernels),  # before Hopper
        (4096, 5000, True, kernels),  # not served: not a multiple of 512
    ],
)
def test_plain_forward_backend_choice_under_auto(monkeypatch, m, n, hopper, expected):
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: hopper)
    assert backends.forward_kernels(m, n, False, [BF16], "auto") is expected
    # the fused forward keeps its own rule: Mosaic GPU from MGPU_FUSED_MIN_ROWS rows
    fused = kernels_mgpu if hopper and kernels_mgpu.supported(m, n, BF16) else kernels
    assert backends.forward_kernels(m, n, True, [BF16], "auto") is fused


@pytest.mark.parametrize("n", [12288, 16384, 16896])
def test_rows_past_max_cols_under_auto(monkeypatch, n):
    """Past MAX_COLS auto runs the fused forward on Mosaic GPU where the grouped kernel
    serves it (measured faster on the H200), not the two-walk one (16896), and keeps the
    plain forward on the Triton-lowered kernel; forcing runs Mosaic GPU for all of them."""
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: True)
    assert kernels_mgpu.supported(4096, n, BF16) and kernels_mgpu.wide(n)
    grouped = kernels_mgpu.fwd_groups(n, BF16) > 0
    assert grouped == (n != 16896)
    fused = backends.forward_kernels(4096, n, True, [BF16], "auto")
    assert fused is (kernels_mgpu if grouped else kernels)
    assert backends.forward_kernels(4096, n, False, [BF16], "auto") is kernels
    for is_fused in (False, True):
        forced = backends.forward_kernels(4096, n, is_fused, [BF16], "mosaic_gpu")
        assert forced is kernels_mgpu


@pytest.mark.parametrize("rows", [4, 2, 1])
@pytest.mark.parametrize("dtypes", [[BF16], [F32], [BF16, F32]], ids=str)
def test_row_vector_is_the_widest_that_tiles_the_row(rows, dtypes):
    """A row kernel's loads: whole 32-lane tiles of the row's warps, as wide as N allows up
    to 16 bytes of the narrowest dtype; 0 where not even single elements tile N."""
    full = kernels_mgpu.vector_len(*dtypes)
    for n in range(1, 4097):
        vec = kernels_mgpu.row_vector(n, rows, *dtypes)
        tile = lambda v: (4 // rows) * 32 * v  # noqa: E731
        if vec == 0:
            assert n % tile(1) != 0, n
            continue
        assert vec in (1, 2, 4, 8) and vec <= full and n % tile(vec) == 0, (n, vec)
        assert vec == full or n % tile(2 * vec) != 0, (n, vec)


def test_backward_blocks_are_the_fewest_rows_that_fit():
    """The backward's row kernel takes one row a block where N allows, else the fewest rows
    (2 or 4) whose loads tile N, that divide M, and whose share of a thread is no more than
    one row of BWD_MAX_COLS."""
    limit = kernels_mgpu.BWD_MAX_COLS

    def fits(m, n, rows):
        ok = rows * n <= limit and m % rows == 0
        return ok and kernels_mgpu.row_vector(n, rows, BF16) > 0

    for m in (1, 2, 4, 6, 7, 8):
        for n in range(1, limit + 1):
            rows = kernels_mgpu.bwd_rows(m, n, BF16)
            if rows:
                assert fits(m, n, rows), (m, n, rows)
            assert not any(fits(m, n, r) for r in (1, 2, 4) if r < rows or not rows), (m, n)
            assert kernels_mgpu.supported_bwd(m, n, BF16) == (rows > 0), (m, n)


@pytest.mark.parametrize("n", [2880, 4160, 896])
def test_narrow_loads_only_when_forced_or_without_triton(monkeypatch, n):
    """Shapes that the row kernels serve with loads narrower than 16 bytes were never
    timed against the Triton-lowered kernels: auto keeps those (also for the fused forward
    from MGPU_FUSED_MIN_ROWS rows); forcing mosaic_gpu, or a JAX without the Pallas Triton
    backend, runs them on Mosaic GPU."""
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: True)
    dtypes = [F32] if n == 4160 else [BF16]
    assert kernels_mgpu.supported(4096, n, *dtypes) and not kernels_mgpu.full_width(n, *dtypes)
    assert backends.forward_kernels(4096, n, True, dtypes, "auto") is kernels
    assert backends.forward_kernels(4096, n, True, dtypes, "mosaic_gpu") is kernels_mgpu
    served_bwd = kernels_mgpu.supported_bwd(4096, n, *dtypes)
    assert served_bwd == (n == 896) and not kernels_mgpu.full_width_bwd(n, *dtypes)
    assert backends.backward_kernels(4096, n, dtypes, "auto") is kernels
    forced = backends.backward_kernels(4096, n, dtypes, "mosaic_gpu")
    assert forced is (kernels_mgpu if served_bwd else kernels)
    monkeypatch.setattr(kernels, "UNAVAILABLE", "ImportError: simulated")
    assert backends.forward_kernels(4096, n, True, dtypes, "auto") is kernels_mgpu
    without = backends.backward_kernels(4096, n, dtypes, "auto")
    assert without is (kernels_mgpu if served_bwd else accel_jax.reference)


@pytest.mark.parametrize(
    "setting, m, n, hopper, expected",
    [
        ("auto", 8192, 4096, True, kernels_mgpu),
        ("auto", 8192, 2048, True, kernels_mgpu),
        ("auto", 4096, 5120, True, kernels_mgpu),
        ("auto", 2048, 4096, True, kernels),  # below MGPU_BWD_MIN_ELEMS: a tie there
        ("auto", 16384, 1024, True, kernels),  # 1024 columns: Triton was faster
        ("auto", 8192, 4096, False, kernels),  # before Hopper
        ("auto", 8192, 3584, True, kernels),  # 8-byte loads: never measured against Triton's
        ("mosaic_gpu", 8192, 3584, True, kernels_mgpu),
        ("mosaic_gpu", 8192, 2880, True, kernels),  # not served: not whole 128-column tiles
        ("mosaic_gpu", 256, 1024, False, kernels_mgpu),
        ("auto", 4096, 7168, True, kernels_mgpu),  # past BWD_MAX_COLS: seven warpgroups
        ("auto", 4096, 12288, True, kernels_mgpu),  # six warpgroups
        ("auto", 2048, 8192, True, kernels_mgpu),  # four warpgroups
        ("auto", 4096, 9216, True, kernels),  # column chunks: Triton was faster
        ("mosaic_gpu", 4096, 9216, True, kernels_mgpu),
        ("mosaic_gpu", 4096, 6656, True, kernels),  # not served: not a multiple of 1024
        ("auto", 4096, 16384, True, kernels),  # past BWD_GROUP_MAX_COLS: column chunks
        ("mosaic_gpu", 4096, 16384, True, kernels_mgpu),
        ("triton", 8192, 4096, True, kernels),
        ("reference", 8192, 4096, True, kernels),
    ],
)
def test_backward_backend_choice(monkeypatch, setting, m, n, hopper, expected):
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: hopper)
    assert backends.backward_kernels(m, n, [BF16], setting) is expected


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="ACCEL_JAX_BACKEND.*cutlass"):
        backends.backend()


def _lower(f, *args):
    return jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


CASES = list(
    itertools.product(
        [(1030, 4096), (7, 8192), (4096, 5120), (64, 3584), (3, 16896), (5, 16384)]
        + [(64, 2880), (8, 128)],
        # ragged rows; 4 and 2 rows; column chunks; two warpgroups; loads narrower than 16
        # bytes
        [BF16, F32],
        [None, "same", F32],  # residual
        [None, BF16],  # weight
        [False, True],  # llama
    )
)


@pytest.mark.parametrize("shape, dtype, residual, weight, llama", CASES, ids=str)
def test_every_variant_lowers_for_cuda(shape, dtype, residual, weight, llama):
    m, n = shape
    res_dtype = dtype if residual == "same" else residual
    round_dtype = res_dtype or dtype
    args = [jax.ShapeDtypeStruct(shape, dtype)]
    args.append(jax.ShapeDtypeStruct(shape, res_dtype) if residual else None)
    args.append(jax.ShapeDtypeStruct((n,), weight) if weight else None)
    dtypes = [a.dtype for a in args if a is not None] + [dtype, round_dtype]
    assert kernels_mgpu.supported(m, n, *dtypes)

    def f(x, r, w):
        return kernels_mgpu.rmsnorm_fwd(
            x, r, w, eps=1e-6, weight_offset=1.0 if weight else 0.0, llama=llama,
            out_dtype=dtype, round_dtype=round_dtype, store_h=True, store_rstd=True,
        )  # fmt: skip

    text = _lower(f, *args)
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


BWD_CASES = list(
    itertools.product(
        [(1030, 4096), (7, 5120), (4099, 1024), (3, 2048), (64, 3584), (5, 7168), (64, 16384)]
        + [(3, 12288), (5, 896), (6, 576), (8, 96)],
        # G > M at 3 rows; 16-bit 3584: 8-byte loads; past BWD_MAX_COLS, seven and six
        # warpgroups, column chunks; 896: 2- and 4-byte loads; blocks of two and four rows
        [BF16, F32],
        [None, BF16],  # weight
        [False, True],  # dh (fused)
        [None, F32],  # dres dtype
    )
)


@pytest.mark.parametrize("shape, dtype, weight, dh, dres", BWD_CASES, ids=str)
def test_every_backward_variant_lowers_for_cuda(shape, dtype, weight, dh, dres):
    m, n = shape
    args = [jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape, dtype)]
    args.append(jax.ShapeDtypeStruct((m,), F32))
    args.append(jax.ShapeDtypeStruct((n,), weight) if weight else None)
    args.append(jax.ShapeDtypeStruct(shape, dtype) if dh else None)
    dtypes = [a.dtype for a in args if a is not None and a.shape != (m,)] + [dtype]
    assert kernels_mgpu.supported_bwd(m, n, *dtypes, *([dres] if dres else []))

    def f(dy, x, rstd, w, dh):
        return kernels_mgpu.rmsnorm_bwd(
            dy, x, rstd, w, dh, weight_offset=1.0, dx_dtype=dtype, dres_dtype=dres
        )

    text = _lower(f, *args)
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.skipif(
    jax.default_backend() == "gpu" or not _jaxlib_lowers_without_compiling(),
    reason="CPU-only check of the lowering (GPU runs compile for real)",
)
def test_public_op_dispatches_to_mosaic_gpu_when_forced(monkeypatch):
    """Through the public op, the custom_vjp and the sharding layer: the forced backend's
    forward kernel and the Triton-lowered backward."""
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False})
    x = jax.ShapeDtypeStruct((2048, 4096), BF16)
    w = jax.ShapeDtypeStruct((4096,), BF16)

    def lowered(train: bool) -> str:
        # a fresh function each time: jit keeps the trace (and the choice) of a function
        def f(x, r, w):
            if not train:
                return accel_jax.rmsnorm_residual_fused(x, r, w)
            loss = lambda *a: jnp.sum(accel_jax.rmsnorm_residual_fused(*a).astype(F32))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1, 2))(x, r, w)

        return jax.jit(f).trace(x, x, w).lower(lowering_platforms=("cuda",)).as_text()

    # train: the forward, then the backward (Triton-lowered, 2048 rows: dx + partials, their
    # sum; Mosaic GPU: one launch, the partials summed by XLA)
    for setting, hopper, mosaic, mosaic_train, triton_train in (
        ("mosaic_gpu", True, 1, 2, 0),
        ("triton", True, 0, 0, 3),
        ("auto", False, 0, 0, 3),  # before Hopper (auto's choice on Hopper: the tables above)
    ):
        monkeypatch.setattr(backends, "hopper_or_newer", lambda hopper=hopper: hopper)
        for how in ("environment", "use_backend"):
            # use_backend wins over the variable (set here to a backend without kernels)
            monkeypatch.setenv(
                "ACCEL_JAX_BACKEND", setting if how == "environment" else "reference"
            )
            for train in (False, True):
                if how == "environment":
                    text = lowered(train)
                else:
                    with accel_jax.use_backend(setting):
                        text = lowered(train)
                expected = mosaic_train if train else mosaic
                key = (setting, hopper, how, train)
                assert text.count("stablehlo.custom_call @mosaic_gpu") == expected, key
                if train:
                    assert text.count("__gpu$xla.gpu.triton") == triton_train, key
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "reference")
    text = lowered(True)
    assert "mosaic_gpu" not in text and "triton" not in text


@pytest.mark.skipif(
    jax.default_backend() == "gpu" or not _jaxlib_lowers_without_compiling(),
    reason="CPU-only check of the lowering (GPU runs compile for real)",
)
@pytest.mark.parametrize("setting, mosaic", [("mosaic_gpu", 2), ("auto", 1)])
def test_gradient_inside_shard_map_with_check_vma(monkeypatch, setting, mosaic):
    """A training step inside a user's shard_map, check_vma on (its default), on Hopper:
    the Mosaic GPU kernels' outputs typed varying like their inputs (Mosaic GPU types them
    invariant; the vjp of the fused op then failed with "unexpected JAX type"). auto: the
    Mosaic GPU fused forward (2048 rows a device), the Triton-lowered backward (1024
    columns)."""
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False})
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: True)
    monkeypatch.setenv("ACCEL_JAX_BACKEND", setting)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    spec = P("data", "model")

    def step(x, r, w, dy):
        f = lambda x, r, w: accel_jax.rmsnorm_residual_fused(x, r, w, return_residual=True)  # noqa: E731
        (y, h), vjp = jax.vjp(f, x, r, w)
        return (y, h, *vjp((dy, h)))

    specs = (spec, spec, P(), spec)
    f = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=(spec,) * 4 + (P(),))
    x = jax.ShapeDtypeStruct((1, 2048, 1024), BF16, sharding=NamedSharding(mesh, spec))
    w = jax.ShapeDtypeStruct((1024,), F32, sharding=NamedSharding(mesh, P()))
    text = jax.jit(f).trace(x, x, w, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == mosaic


def test_use_backend_wins_over_the_environment_and_nests(monkeypatch):
    monkeypatch.setenv("ACCEL_JAX_BACKEND", "reference")
    with accel_jax.use_backend("Triton"):
        assert backends.backend() == "triton"
        with accel_jax.use_backend("mosaic_gpu"):
            assert backends.backend() == "mosaic_gpu"
        assert backends.backend() == "triton"
        with pytest.raises(RuntimeError), accel_jax.use_backend("auto"):
            raise RuntimeError  # an error inside a block still restores the setting
        assert backends.backend() == "triton"
    assert backends.backend() == "reference"
    with pytest.raises(ValueError, match="use_backend.*cutlass"), accel_jax.use_backend("cutlass"):
        pass
    with pytest.raises(ValueError, match="use_backend.*None"), accel_jax.use_backend(None):
        pass


def test_forcing_mosaic_gpu_before_hopper_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False})
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: False)
    x = jax.ShapeDtypeStruct((2048, 4096), BF16)
    w = jax.ShapeDtypeStruct((4096,), BF16)
    with (
        pytest.raises(ValueError, match="'mosaic_gpu' needs .* compute capability 9.0"),
        accel_jax.use_backend("mosaic_gpu"),
    ):
        jax.jit(accel_jax.rmsnorm).trace(x, w)
    with accel_jax.use_backend("triton"):  # the other backends trace there
        jax.jit(accel_jax.rmsnorm).trace(x, w)


@pytest.mark.parametrize("setting, mosaic", [("mosaic_gpu", 2), ("auto", 1), ("triton", 0)])
def test_training_step_past_max_cols_through_the_public_op(monkeypatch, setting, mosaic):
    """4096x16384, fused forward and backward as a training step lowers them for CUDA: forced
    Mosaic GPU runs its grouped forward and two-walk backward (one launch each), auto the
    grouped forward and the Triton-lowered backward."""
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False})
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: True)
    x = jax.ShapeDtypeStruct((4096, 16384), BF16)
    w = jax.ShapeDtypeStruct((16384,), BF16)

    def step(x, r, w):
        loss = lambda *a: jnp.sum(accel_jax.rmsnorm_residual_fused(*a).astype(F32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(x, r, w)

    with accel_jax.use_backend(setting):
        text = jax.jit(step).trace(x, x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == mosaic
    assert (text.count("__gpu$xla.gpu.triton") > 0) == (setting != "mosaic_gpu")


@pytest.mark.skipif(
    jax.default_backend() == "gpu" or not _jaxlib_lowers_without_compiling(),
    reason="CPU-only check of the lowering (GPU runs compile for real)",
)
def test_without_the_pallas_triton_backend(monkeypatch):
    """On a JAX without the Pallas Triton backend (simulated), a training step lowered for
    CUDA: on Hopper, auto runs the Mosaic GPU forward and backward wherever they serve the
    shape (vmapped too), also where auto would otherwise take the Triton-lowered ones (256
    rows, 1024 columns), but for the two-walk kernels (measured slower than XLA's fusion of
    the reference math), and the reference math elsewhere (1000 columns); before
    Hopper the reference math everywhere; forcing triton is an error naming what is
    missing. One warning per outcome."""
    monkeypatch.setattr(kernels, "UNAVAILABLE", "ImportError: simulated")
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)
    monkeypatch.setattr(ops, "_STATE", {"interpret": False, "warned_no_kernels": set()})
    monkeypatch.delenv("ACCEL_JAX_BACKEND", raising=False)

    def lowered(m, n, vmapped=False):
        x = jax.ShapeDtypeStruct((m, n), BF16)
        w = jax.ShapeDtypeStruct((n,), BF16)

        def step(x, r, w):  # a fresh function each time: jit keeps the trace of a function
            loss = lambda *a: jnp.sum(accel_jax.rmsnorm_residual_fused(*a).astype(F32))  # noqa: E731
            grad = jax.grad(loss, argnums=(0, 1, 2))
            if vmapped:
                return jax.vmap(grad, in_axes=(0, 0, None))(x[None], r[None], w)
            return grad(x, r, w)

        text = jax.jit(step).trace(x, x, w).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" not in text, (m, n)
        return text.count("stablehlo.custom_call @mosaic_gpu")

    for hopper, m, n, vmapped, mosaic in (
        (True, 4096, 4096, False, 2),
        (True, 256, 4096, False, 2),  # auto with the Triton backend: Triton's
        (True, 4096, 1024, False, 2),
        (True, 64, 1000, False, 0),  # not served
        (True, 64, 16384, False, 1),  # the grouped forward; the two-walk backward lost to XLA
        (True, 64, 16896, False, 0),  # the two-walk forward and backward lost to XLA
        (True, 64, 4096, True, 2),  # vmapped: Pallas batches the Mosaic GPU kernels
        (False, 4096, 4096, False, 0),
    ):
        monkeypatch.setattr(backends, "hopper_or_newer", lambda hopper=hopper: hopper)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert lowered(m, n, vmapped) == mosaic, (hopper, m, n, vmapped)
        said = [str(w.message) for w in caught if "accel_jax" in str(w.message)]
        if hopper and (m, n) == (4096, 4096):
            assert len(said) == 1 and "Mosaic GPU kernels where they serve" in said[0], said
        elif not hopper:
            assert len(said) == 1 and "reference math instead" in said[0], said
        else:
            assert not said, said  # once per outcome
    monkeypatch.setattr(backends, "hopper_or_newer", lambda: True)
    with (
        pytest.raises(ValueError, match="'triton' needs JAX's Pallas Triton backend.*simulated"),
        accel_jax.use_backend("triton"),
    ):
        lowered(4096, 4096)


def _races_found() -> bool:
    """Whether Mosaic GPU's interpret mode saw a race in the last kernel it ran."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    except ImportError as e:
        pytest.skip(f"this JAX's race detector state is out of reach: {e}")
    return interpret_pallas_call.get_races().races_found


# One of each kernel: rows in registers, in warpgroups (grouped) and in column chunks.
RACE_SHAPES = [(5, 1024), (3, 12288), (3, 16896), (5, 6144), (3, 9216)]


def _run_interpreted(m, n):
    """The forward (saving rstd) and, where served, the backward of (M, N) bf16, each
    interpreted; returns whether each saw a race."""
    x = jax.random.normal(jax.random.key(0), (m, n), BF16)
    w = jax.random.normal(jax.random.key(1), (n,), BF16)
    races = []
    if kernels_mgpu.supported(m, n, BF16):
        args = dict(eps=1e-6, weight_offset=0.0, llama=False, out_dtype=BF16, round_dtype=BF16)
        out = kernels_mgpu.rmsnorm_fwd(
            x, x, w, **args, store_h=True, store_rstd=True, interpret=True
        )
        jax.block_until_ready(out)
        races.append(_races_found())
    if kernels_mgpu.supported_bwd(m, n, BF16):
        rstd = jnp.ones((m,), F32)
        out = kernels_mgpu.rmsnorm_bwd(
            x, x, rstd, w, None, weight_offset=0.0, dx_dtype=BF16, dres_dtype=None, interpret=True
        )
        jax.block_until_ready(out)
        races.append(_races_found())
    return races


@pytest.mark.skipif(kernels_mgpu.INTERPRET_UNAVAILABLE is not None, reason="no interpret mode")
@pytest.mark.parametrize("shape", RACE_SHAPES, ids=str)
def test_interpreted_kernels_see_no_race(monkeypatch, shape):
    monkeypatch.setattr(kernels_mgpu, "BWD_MAX_PROGRAMS", 2)
    monkeypatch.setattr(kernels_mgpu, "BWD_GROUP_PROGRAMS", 2)
    races = _run_interpreted(*shape)
    assert races and not any(races)


@pytest.mark.skipif(kernels_mgpu.INTERPRET_UNAVAILABLE is not None, reason="no interpret mode")
@pytest.mark.parametrize(
    "shape, expected",
    [((3, 12288), [True, True]), ((5, 6144), [False, True])],  # 6144: two rows per forward
    ids=str,
)
def test_race_detector_sees_a_missing_barrier(monkeypatch, shape, expected):
    """The grouped kernels with the barrier taken out of the segment sums' exchange: every
    warpgroup then reads the others' sums unordered with their writes (the forward at 6144
    columns holds its rows in one warpgroup: nothing to race)."""

    def meet_without_barrier(parts_ref, barrier, part):
        parts_ref[jax.lax.axis_index("group")] = part

    monkeypatch.setattr(kernels_mgpu, "_meet", meet_without_barrier)
    assert _run_interpreted(*shape) == expected
