"""The README's Python example is formatted and linted like the project's own code."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_a_python_example():
    assert _python_blocks()


@pytest.mark.parametrize(
    "command",
    [
        ["format", "--check"],
        # The example's inputs (x, weight, model, ...) are the reader's: undefined names pass.
        ["check", "--ignore", "F821"],
    ],
    ids=["format", "check"],
)
def test_readme_python_is_ruff_clean(command):
    pytest.importorskip("ruff")
    for block in _python_blocks():
        run = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--stdin-filename", "README_example.py", "-"],
            input=block,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stdout + run.stderr
