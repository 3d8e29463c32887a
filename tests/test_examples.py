"""The examples run as a user runs them (a subprocess, ACCEL_INTERPRET unset) and the two
loss curves of each, with this project's RMSNorm and with the framework's own, agree.

Bound: every step's loss within 1e-4 relative of the reference's on the CPU, where both
runs use plain fp32 math of the same formula, and 1e-3 on a GPU, where the kernels' fp32
sums are ordered differently and 8 optimizer steps can carry that rounding into the loss.
A wrong scale moves it by far more: Gemma's 1 + w in place of w shifts the first loss of
the Llama example by 6e-3 relative and the third by 4e-2.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def run_example(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("ACCEL_INTERPRET", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--steps", str(STEPS)]
        + ["--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time per step" in proc.stdout and "difference" in proc.stdout
    return json.loads(out.read_text())


def check_curves(res: dict) -> None:
    ref, ours = res["reference"], res["accel"]
    assert len(ref) == len(ours) == STEPS
    rel = 1e-4 if res["device"] == "cpu" else 1e-3
    for step, (a, b) in enumerate(zip(ref, ours, strict=True)):
        assert b == pytest.approx(a, rel=rel), (step, a, b)
    assert ref[-1] < 0.85 * ref[0], ref  # it trains: the loss falls
    assert res["reference_ms"] > 0 and res["accel_ms"] > 0


@pytest.mark.skipif(
    find_spec("torch") is None or find_spec("transformers") is None,
    reason="needs torch and transformers",
)
def test_hf_llama_with_and_without_replace_rmsnorm(tmp_path):
    res = run_example("hf_llama", tmp_path)
    assert res["swapped"] == 5  # 2 layers x 2 norms + the final norm
    check_curves(res)


@pytest.mark.skipif(
    find_spec("jax") is None or find_spec("flax") is None, reason="needs jax and flax"
)
def test_flax_nnx_with_accel_jax_rmsnorm(tmp_path):
    check_curves(run_example("flax_nnx", tmp_path))
