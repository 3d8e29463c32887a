"""The README's results section, cut from the committed benchmark markdown.

    python -m bench.readme_table      # rewrite README.md between its two markers

The README quotes, per operation, the cold and warm time tables of
``bench/results/rmsnorm_bf16.md`` word for word, plus host overhead and the run's header;
a test checks that the README still equals what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "results" / "rmsnorm_bf16.md"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
KEEP_CAPTIONS = ("cold us", "warm us")


def _blocks(lines: list[str]):
    """(caption, table lines) for each caption line followed by a markdown table."""
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            caption = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            yield caption, lines[i:j]
            i = j
        else:
            i += 1


def readme_section(md: str) -> str:
    """The results section for the README from the benchmark markdown ``md``."""
    lines = md.splitlines()
    out = [line for line in lines[2:5] if line.startswith("- ")]
    section = ""
    for caption, table in _blocks(lines):
        heading = next(h for h in lines[: lines.index(table[0])][::-1] if h.startswith("## "))
        keep = caption.startswith(KEEP_CAPTIONS) or heading.startswith("## Host overhead")
        if not keep:
            continue
        if heading != section:
            out += ["", f"#### {heading[3:]}"]
            section = heading
        if not heading.startswith("## Host overhead"):
            out += ["", caption]
        out += [""] + table
    return "\n".join(out)


def readme_block(readme: str) -> str:
    """What the README holds between its markers."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[start:end].strip("\n")


def main() -> int:
    section = readme_section(RESULTS_MD.read_text())
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + section + "\n" + text[end:])
    print(f"README.md: results section rewritten from {RESULTS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
