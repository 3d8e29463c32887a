"""The README's results tables say what they show: each one checked against the results JSON.

The README is parsed on its own (headings, captions, tables) and every cell of every table
is compared with the record it must come from in the committed results JSON, so a table
under the wrong operation's heading, or a caption of the wrong timing mode, fails here.
"""

import json
import re

import pytest

from bench.readme_table import README, RESULTS_JSON, readme_block, readme_section

from .fakes import synthetic_results
from .test_report import WIDE


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS_JSON.read_text())


def _sections(block: str) -> dict[str, list[tuple[str, list[list[str]]]]]:
    """``{heading: [(caption, rows of cells), ...]}`` from the README's results block."""
    sections: dict[str, list] = {}
    heading, caption, table = None, "", []
    for line in block.splitlines() + [""]:
        if line.startswith("#### "):
            heading = line[5:]
            sections[heading] = []
        elif line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        else:
            if table:
                sections[heading].append((caption, table))
                table = []
            if line.strip():
                caption = line
    return sections


def _us(cell: str) -> float:
    return float(re.match(r"[\d.]+", cell).group())


def _record(results, impl, shape, op):
    return next(
        r for r in results["records"] if r["impl"] == impl and r["shape"] == shape and r["op"] == op
    )


def test_each_time_table_sits_under_its_own_operation(results):
    sections = _sections(readme_block(README.read_text()))
    labels = {d["label"]: d["name"] for d in results["impls"]}
    for op in results["ops"]:
        tables = sections[f"{op}: {results['op_titles'][op]}"]
        assert [c.split(" us")[0] for c, _ in tables] == ["cold", "warm"]
        for caption, (header, _, *rows) in tables:
            mode = caption.split(" us")[0]
            assert "own same-bytes copy" in caption
            assert [r[0] for r in rows] == results["shapes"]
            for row in rows:
                shape = row[0]
                for label, cell in zip(header[4:], row[4:], strict=True):
                    rec = _record(results, labels[label], shape, op)
                    assert rec["status"] == "ok", (op, shape, label)
                    assert _us(cell) == pytest.approx(rec[f"{mode}_us"], rel=0.006, abs=0.06), (
                        op,
                        mode,
                        shape,
                        label,
                    )
                    share = round(100 * rec[f"{mode}_copy_share"])
                    assert cell.endswith(f"({share}%)"), (op, mode, shape, label, cell)


def test_host_overhead_and_first_call_have_their_own_headings(results):
    sections = _sections(readme_block(README.read_text()))
    labels = {d["label"]: d["name"] for d in results["impls"]}
    (_, (header, _, *rows)) = sections["Host overhead (CPU us per call at 1x4096)"][0]
    for row in rows:
        for label, cell in zip(header[1:], row[1:], strict=True):
            host = next(
                h
                for h in results["host_overhead"]
                if h["op"] == row[0] and h["impl"] == labels[label]
            )
            assert float(cell) == pytest.approx(host["us_per_call"], abs=0.06)
    first = [h for h in sections if h.startswith("First call, s")]
    assert len(first) == 1
    (_, (header, _, *rows)) = sections[first[0]][0]
    compile_fwd = dict(zip(header, next(r for r in rows if r[0] == "fwd"), strict=True))
    secs = sorted(
        r["first_call_s"]
        for r in results["records"]
        if r["impl"] == "torch_compile" and r["op"] == "fwd"
    )
    assert float(compile_fwd["compile"]) >= secs[0] - 0.005  # compile: seconds, not us
    assert float(compile_fwd["compile"]) <= secs[-1] + 0.005


def test_readme_is_what_the_generator_writes(results):
    assert readme_block(README.read_text()) == readme_section(results), (
        "run: python -m bench.readme_table"
    )


def test_section_has_a_row_per_shape_and_says_how_peers_differ():
    res = synthetic_results(shapes=WIDE)
    section = readme_section(res)
    sections = _sections(section)
    for op in res["ops"]:
        tables = sections[f"{op}: {res['op_titles'][op]}"]
        assert len(tables) == 2
        for _, (_, _, *rows) in tables:
            assert [r[0] for r in rows] == list(WIDE)
    assert "- differs: quack fused: y normalizes the fp32 sum x + r" in section
