"""Shapes, ops and the bytes model of the benchmark."""

import pytest

from bench.shapes import (
    CPU_SHAPES,
    GPU_SHAPES,
    OPS,
    WIDTH_SHAPES,
    Shape,
    bytes_moved,
    copy_words,
    itemsize,
    parse_ops,
    parse_shape,
    parse_shapes,
    unique_shapes,
)


def test_promised_shapes_are_the_default_gpu_table():
    # hidden=4096/seq=2048, hidden=8192/seq=2048, hidden=4096/seq=8192, then the list.
    assert [parse_shape(s) for s in GPU_SHAPES] == [
        Shape(2048, 4096),
        Shape(2048, 8192),
        Shape(8192, 4096),
        Shape(4096, 5120),
        Shape(4096, 7168),
        Shape(4096, 16384),
        Shape(32768, 2048),
        Shape(256, 4096),
    ]
    assert all(parse_shape(s).numel <= 256 * 4096 for s in CPU_SHAPES)


@pytest.mark.parametrize(
    ("op", "dtype", "expected"),
    [
        ("fwd", "bf16", 2 * 2048 * 4096 * 2),  # read x, write y
        ("fused", "bf16", 4 * 2048 * 4096 * 2),  # read x, r; write y, h
        ("fwdbwd", "bf16", 5 * 2048 * 4096 * 2),  # x, y; x, dy, dx
        ("fwd", "fp16", 2 * 2048 * 4096 * 2),
        ("fwd", "fp32", 2 * 2048 * 4096 * 4),
        ("fwdbwd", "fp32", 5 * 2048 * 4096 * 4),
    ],
)
def test_bytes_moved(op, dtype, expected):
    assert bytes_moved(op, Shape(2048, 4096), dtype) == expected


def test_bytes_moved_contract_example():
    # DESIGN.md: a copy of 2048x4096's (bf16 forward) bytes at 2.0 TB/s takes 16.7 us.
    nbytes = bytes_moved("fwd", Shape(2048, 4096), "bf16")
    assert nbytes == 33_554_432
    assert nbytes / 16.7e-6 / 1e12 == pytest.approx(2.0, abs=0.01)


def test_bytes_moved_rejects_unknown():
    with pytest.raises(ValueError, match="op"):
        bytes_moved("bwd", Shape(2, 2), "bf16")
    with pytest.raises(ValueError, match="dtype"):
        itemsize("int8")


def test_copy_words_covers_half_the_bytes():
    # The floor copy reads half and writes half of the op's bytes, in 4-byte words.
    assert copy_words(33_554_432) == 33_554_432 // 8
    assert 8 * copy_words(10) >= 10 and 8 * (copy_words(10) - 1) < 10
    assert copy_words(5 * 3 * 7 * 2) * 8 - 5 * 3 * 7 * 2 < 8
    with pytest.raises(ValueError):
        copy_words(-1)


def test_parse_shapes_and_ops():
    assert parse_shapes("2048x4096, 256X4096") == [Shape(2048, 4096), Shape(256, 4096)]
    assert parse_shapes(["1x1"]) == [Shape(1, 1)]
    assert parse_shape("2048x4096").name == "2048x4096"
    assert parse_ops("fwdbwd,fwd") == ["fwdbwd", "fwd"]
    assert tuple(parse_ops(",".join(OPS))) == OPS
    for bad in ("2048", "2048x", "ax4", "0x4096", "4x0", "1x2x3", "-1x4"):
        with pytest.raises(ValueError, match="shape"):
            parse_shape(bad)
    with pytest.raises(ValueError):
        parse_shapes(" , ")
    with pytest.raises(ValueError, match="unknown ops"):
        parse_ops("fwd,bwd")


def test_width_shapes_are_4096_rows_of_model_widths():
    widths = parse_shapes(WIDTH_SHAPES)
    assert [(s.rows, s.hidden) for s in widths] == [
        (4096, n) for n in (3072, 3584, 4608, 5120, 6144, 7168)
    ]
    # two of them are in the default table already
    assert [s for s in widths if s.name in GPU_SHAPES] == [Shape(4096, 5120), Shape(4096, 7168)]


def test_unique_shapes_keeps_the_first_of_each_in_order():
    a, b, c = Shape(1, 2), Shape(3, 4), Shape(5, 6)
    assert unique_shapes([b, a, b], [c, a]) == [b, a, c]
    assert unique_shapes([a], []) == [a] and unique_shapes() == []
