"""How accel_torch imports: without Triton (the fallback runs, a kernel call says what is
missing), and with Triton imported first under ACCEL_INTERPRET=1 (a clear ImportError).
Each case runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

_BLOCK_TRITON = """
import sys

class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoTriton())
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("ACCEL_INTERPRET", "TRITON_INTERPRET")
    }
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_imports_and_falls_back_without_triton(interpret):
    code = (
        _BLOCK_TRITON
        + """
import warnings
warnings.simplefilter("ignore")
import torch
import accel_torch
from accel_torch import launch
assert "triton" not in sys.modules
assert not accel_torch.interpret_enabled()
x = torch.randn(3, 16, requires_grad=True)
w = torch.rand(16) + 0.5
y = accel_torch.rmsnorm(x, w)
x64 = x.detach().double()
want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max(), "wrong values"
y.sum().backward()
assert x.grad is not None
try:
    launch.rmsnorm_fwd_launch(x.detach(), None, w, 1e-6, 0.0, False, None)
except RuntimeError as e:
    assert "Triton" in str(e) and "not installed" in str(e), e
else:
    raise AssertionError("a kernel launch without Triton did not raise")
try:
    accel_torch.set_interpret(True)
except ValueError as e:
    assert "Triton" in str(e), e
else:
    raise AssertionError("set_interpret(True) without Triton did not raise")
print("ok")
"""
    )
    done = _run(code, ACCEL_INTERPRET=interpret)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_triton_imported_first_under_accel_interpret_fails_clearly():
    done = _run("import triton\nimport accel_torch\n", ACCEL_INTERPRET="1")
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "TRITON_INTERPRET=1" in done.stderr, done.stderr[-3000:]


def test_triton_imported_first_with_triton_interpret_set_works():
    code = """
import triton, torch
import accel_torch
assert accel_torch.interpret_enabled()
x = torch.randn(2, 8)
assert torch.allclose(accel_torch.rmsnorm(x), accel_torch.rmsnorm_torch(x), rtol=1e-6, atol=1e-6)
print("ok")
"""
    done = _run(code, ACCEL_INTERPRET="1", TRITON_INTERPRET="1")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.gpu
def test_cuda_tensor_without_triton_raises_clearly():
    # torch.cuda's initialization imports triton itself (torch 2.11): initialize first, then
    # forget triton and block it, so that only accel_torch's import meets its absence.
    code = (
        """
import sys
import torch
torch.cuda.init()
for name in [k for k in sys.modules if k == "triton" or k.startswith("triton.")]:
    del sys.modules[name]
"""
        + _BLOCK_TRITON
        + """
import accel_torch
try:
    accel_torch.rmsnorm(torch.randn(2, 8, device="cuda"))
except RuntimeError as e:
    assert "Triton" in str(e) and "cuda" in str(e), e
    print("ok")
"""
    )
    done = _run(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
