"""Tables, JSON schema, markdown and the PNG plot, on synthetic results (no timing)."""

import json
import math

import pytest

from bench import report
from bench.shapes import WIDTH_SHAPES

from .fakes import SHAPES, synthetic_results

# The default fakes' shapes followed by the model widths: 8 shapes, not the usual 2.
WIDE = tuple(SHAPES.split(",")) + WIDTH_SHAPES


@pytest.fixture(params=["cuda", "cpu"])
def results(request):
    return synthetic_results(request.param)


def test_schema_accepts_what_the_runner_assembles(results):
    assert report.validate(results) == []


def test_schema_catches_problems():
    res = synthetic_results()
    del res["versions"]["jaxlib"]
    res["records"][0]["status"] = "great"
    res["records"][1]["cold_us"] = "fast"
    res["floors"][0].pop("warm_us")
    bad = report.validate(res)
    assert any("jaxlib" in p for p in bad)
    assert any("status 'great'" in p for p in bad)
    assert any("'cold_us' is str" in p for p in bad)
    assert any("floors[0]" in p for p in bad)
    res = synthetic_results()
    miss = next(r for r in res["records"] if r["status"] == "missing")
    miss["reason"] = None
    assert any("without a reason" in p for p in report.validate(res))
    assert report.validate({"schema": "x"})  # incomplete top level


def test_time_table_cells():
    res = synthetic_results()
    header, rows = report.time_table(res, "fwd", "cold")
    assert header[:4] == ["shape", "MB moved", "copy (torch)", "copy (jax)"]
    assert "liger" not in header  # never timed: a missing column, listed below the tables
    row = dict(zip(header, rows[0], strict=True))
    assert row["shape"] == "2048x4096" and row["MB moved"] == "33.6"
    assert row["copy (torch)"] == "16.7"
    assert row["accel_torch"] == "20.0 (84%)"  # 16.7 / 20.0
    assert row["eager"] == "60.0 (28%)"
    _, rows = report.time_table(res, "fwdbwd", "cold")
    assert dict(zip(header, rows[0], strict=True))["compile"] == "error"


def test_speedup_table_cells():
    res = synthetic_results()
    header, rows = report.speedup_table(res, "fused", "cold")
    row = dict(zip(header, rows[0], strict=True))
    assert row["accel_torch"] == "3.00x / 1.50x"  # eager 60 / 20; best peer F.rms_norm 30 / 20
    assert row["eager"].startswith("1.00x / ")


def test_text_and_markdown_reports(results):
    ok = next(r for r in results["records"] if r["impl"] == "accel_torch" and r["op"] == "fwd")
    ok["notes"].append("warm (CUDA graph): RuntimeError: capture failed")
    text = report.text_report(results)
    md = report.markdown_report(results)
    for out in (text, md):
        assert "2048x4096" in out and "256x4096" in out
        assert "missing: liger" in out and "fake failure" in out
        assert "host overhead" in out.lower() and "peak memory" in out.lower()
        assert "note: accel_torch fwd (2048x4096): warm (CUDA graph): RuntimeError" in out
    assert "- jax_xla fwdbwd: fusion" in md  # the JAX kernels CUPTI saw, for auditing
    assert md.count("| shape |") >= 3
    assert "first call" in text.lower() and "0.50" in text  # fakes: 0.5 s first calls
    if results["device"]["kind"] == "cuda":
        assert "cold us (L2 flushed)" in text and "20.0 (84%)" in text
    else:
        assert "CPU wall-clock" in text and "cold us" not in text


def test_write_all(results, tmp_path):
    results["records"][-1]["notes"].append(float("nan"))  # never written as NaN
    paths = report.write_all(results, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert report.validate(data) == []
    assert data["records"][:-1] == results["records"][:-1]
    assert data["records"][-1]["notes"] == [None]
    assert all(
        not (isinstance(v, float) and not math.isfinite(v))
        for r in data["records"]
        for v in r.values()
    )
    assert paths["markdown"].read_text().startswith("# RMSNorm benchmark results")
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_captions_say_whose_copy_each_share_is_of(results):
    text, md = report.text_report(results), report.markdown_report(results)
    on_cpu = results["device"]["kind"] != "cuda"
    for out in (text, md):
        assert "the framework's own same-bytes copy time / op time" in out
        assert "torch columns against copy (torch), JAX columns against copy (jax)" in out
        # On a CPU the two copies are timed through different paths: said in every caption.
        assert (report.CPU_SHARE in out) == on_cpu
        assert (report.NO_PEAK_ON_CPU in out) == on_cpu


def test_text_report_leaves_out_notes_already_printed():
    res = synthetic_results("cpu")
    assert "a note" in report.text_report(res)
    assert "a note" not in report.text_report(res, omit_notes=("a note",))


def test_plot_series_is_ours_and_the_fastest_peer_of_each_framework():
    res = synthetic_results()
    series = report.plot_series(res, "fwd", "cold")
    assert list(series) == ["accel_torch", "best torch peer", "accel_jax", "best jax peer"]
    copy_us = 16.7  # the fakes' torch and JAX copies at 2048x4096 fwd, cold
    # torch peers: eager 60, F.rms_norm 30, compile 40 (liger missing): F.rms_norm is fastest
    assert series["best torch peer"][0] == (pytest.approx(copy_us / 30.0), "F.rms_norm")
    assert series["accel_torch"][0] == (pytest.approx(copy_us / 20.0), None)
    # JAX peers: xla 25, flax 28
    assert series["best jax peer"][0] == (pytest.approx(copy_us / 25.0), "xla")
    assert len(series["accel_jax"]) == len(res["shapes"])


@pytest.mark.parametrize("shapes", [SHAPES, WIDE], ids=["2 shapes", "8 shapes"])
def test_figure_shapes_are_categories_with_an_x_label(results, shapes):
    import matplotlib.pyplot as plt

    results = synthetic_results(results["device"]["kind"], shapes)
    fig = report.figure(results)
    try:
        axes = fig.axes
        assert len(axes) == len(results["ops"]) * len(report.modes(results))
        for ax in axes:
            assert [t.get_text() for t in ax.get_xticklabels()] == results["shapes"]
            assert ax.get_xlabel() == "shape (rows x hidden)"
            assert len(ax.containers) == 4  # bars: ours and best peer, per framework
            assert any(list(line.get_ydata()) == [100, 100] for line in ax.get_lines())
    finally:
        plt.close(fig)


def test_peer_math_differences_are_said_beside_the_numbers(results):
    text, md = report.text_report(results), report.markdown_report(results)
    note = "differs: quack fused: y normalizes the fp32 sum x + r, not h rounded"
    assert note in text
    assert "## Implementations" in md and "  - differs (fused): y normalizes the fp32 sum" in md
    assert "- `liger` (liger, torch): " in md and "  - missing: liger_kernel" in md
    results["impls"] = [d for d in results["impls"] if d["name"] != "quack"]
    assert "differs:" not in report.text_report(results)  # the other peers follow the contract


def test_every_output_has_a_row_per_shape_with_the_widths(tmp_path):
    res = synthetic_results(shapes=WIDE)
    assert res["shapes"] == list(WIDE) and report.validate(res) == []
    for op in res["ops"]:
        for table in (report.time_table, report.gbps_table, report.speedup_table):
            _, rows = table(res, op, "cold")
            assert [r[0] for r in rows] == list(WIDE)
            assert all("-" not in r[-1] for r in rows), rows  # accel_jax timed at every shape
        assert all(len(v) == len(WIDE) for v in report.plot_series(res, op, "warm").values())
    assert [r[0] for r in report.memory_table(res)[1]] == list(WIDE)
    md = report.markdown_report(res)
    assert all(md.count(f"| {s} |") == 3 * 2 * 3 + 1 for s in WIDE)  # 3 ops x 2 modes x 3, memory
    paths = report.write_all(res, tmp_path)
    assert json.loads(paths["json"].read_text())["shapes"] == list(WIDE)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
