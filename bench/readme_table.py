"""The README's results section, built from a committed benchmark's JSON.

    python -m bench.readme_table      # rewrite README.md between its two markers

The run's header (and how any peer's math differs from the contract's), then per operation,
the cold and warm time tables of ``bench/results/h200/rmsnorm_bf16.json``,
each under the heading of its own operation, then host overhead and first-call seconds,
each under its own heading. A test checks every table's cells against the JSON records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "h200" / "rmsnorm_bf16.json"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def readme_section(results: dict) -> str:
    """The README's results section (markdown) for a results dictionary."""
    lines = report.header_lines(results) + report.op_note_lines(results)
    out = [f"- {line}" for line in lines]
    for op in results["ops"]:
        out += ["", f"#### {op}: {results['op_titles'][op]}"]
        for mode in report.modes(results):
            out += ["", report.time_caption(results, mode), ""]
            out.append(report.render_markdown(*report.time_table(results, op, mode)))
    if results["host_overhead"]:
        out += ["", f"#### {report.HOST_TITLE}", ""]
        out.append(report.render_markdown(*report.host_table(results)))
    out += ["", f"#### {report.FIRST_CALL_TITLE}", ""]
    out.append(report.render_markdown(*report.first_call_table(results)))
    return "\n".join(out)


def readme_block(readme: str) -> str:
    """What the README holds between its markers."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[start:end].strip("\n")


def main() -> int:
    section = readme_section(json.loads(RESULTS_JSON.read_text()))
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + section + "\n" + text[end:])
    print(f"README.md: results section rewritten from {RESULTS_JSON.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
