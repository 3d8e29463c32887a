"""The README's results tables are the committed H100 results, word for word."""

from bench.readme_table import README, RESULTS_MD, readme_block, readme_section


def test_readme_results_equal_committed_benchmark():
    assert RESULTS_MD.exists(), "bench/results/rmsnorm_bf16.md is committed"
    expected = readme_section(RESULTS_MD.read_text())
    assert "accel_torch" in expected and "cold us" in expected and "warm us" in expected
    assert readme_block(README.read_text()) == expected, "run: python -m bench.readme_table"
