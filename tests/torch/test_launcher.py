"""The direct launcher (accel_torch/launcher.py): its cache key against Triton's own
specialization (CPU), and on the GPU, direct launches against Triton's launches bit for bit,
under CUDA-graph capture and with a launch hook installed."""

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from accel_torch import kernels, launch  # noqa: E402
from accel_torch.launcher import Launcher, int_class, tensor_class  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

INTS = [0, 1, 2, 3, 15, 16, 17, 31, 32, 48, 4096, 4097, 2**31 - 16, 2**31 - 1, 2**31]
INTS += [2**31 + 16, 2**32, 2**40 + 3, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16, -1, -16, -(2**31)]
INTS += [-(2**31) - 1, -(2**31) - 16]


def _triton_spec(value):
    """Triton's own specialization of one launch argument (type, attribute)."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native(BaseBackend, value, False, True, True)


def _refines(values, ours, theirs):
    """Arguments with the same key of ours have the same specialization of Triton's."""
    seen = {}
    for v in values:
        spec = seen.setdefault(ours(v), theirs(v))
        assert spec == theirs(v), (v, ours(v), spec, theirs(v))
    return len(seen)


def test_int_key_refines_triton_specialization():
    assert _refines(INTS, int_class, _triton_spec) >= 6  # 1; i32, i64, u64, each with/without D


def test_tensor_key_refines_triton_specialization():
    base = torch.empty(64, dtype=torch.float32)
    views = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = base.view(dtype) if dtype != torch.float32 else base
        views += [t, t[1:], t[2:], t[4:], t[8:]]
    assert _refines(views, tensor_class, _triton_spec) >= 6


@pytest.mark.parametrize(
    "kernel",
    [kernels.rmsnorm_fwd_kernel, kernels.rmsnorm_bwd_kernel, kernels.dweight_reduce_kernel],
)
def test_launcher_takes_constexprs_last_in_signature_order(kernel):
    params = list(inspect.signature(kernel.fn).parameters)
    names = Launcher(kernel).constexpr_names
    assert names and params[-len(names) :] == list(names)


# ---- on the GPU ----


def _cases():
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    big = randn(9, 4096 + 24)
    yield "aligned bf16", randn(8, 4096), randn(4096), randn(8, 4096)
    yield "misaligned rows", big[:, 3:4099], randn(4096), randn(9, 4096)
    yield "one row", randn(1, 5120), randn(5120), randn(1, 5120)
    yield "odd width", randn(33, 4097, dtype=torch.float32), randn(4097), randn(33, 4097)
    yield "one column", randn(17, 1), randn(1), randn(17, 1)
    yield "wide looped", randn(3, 20000), randn(20000), randn(3, 20000)
    yield "many rows", randn(3000, 2048, dtype=torch.float16), randn(2048), randn(3000, 2048)


def _run(x, w, r):
    y, _, rstd = launch.rmsnorm_fwd_launch(x, None, w, 1e-6, 0.0, False, None)
    yf, h, _ = launch.rmsnorm_fwd_launch(x, r.to(x.dtype), w, 1e-6, 1.0, True, torch.float32)
    dy = torch.ones_like(x).mul_(0.5).add_(y)
    dx, dres, dw = launch.rmsnorm_bwd_launch(dy, x, w, rstd, dy, 0.0, torch.float32)
    return y, rstd, yf, h, dx, dres, dw


@gpu
@needs_cuda
def test_direct_launches_match_triton_launches(monkeypatch):
    launchers = (launch._fwd, launch._bwd, launch._reduce)
    jit_calls = []
    for launcher in launchers:
        original = launcher.jit_launch

        def counted(*args, _original=original):
            jit_calls.append(1)
            return _original(*args)

        monkeypatch.setattr(launcher, "jit_launch", counted)
    for name, x, w, r in _cases():
        for launcher in launchers:
            monkeypatch.setattr(launcher, "direct", False)
        expected = _run(x, w, r)
        for launcher in launchers:
            monkeypatch.setattr(launcher, "direct", True)
        _run(x, w, r)  # fills the caches of any new specialization
        jit_calls.clear()
        got = _run(x, w, r)
        assert not jit_calls, f"{name}: {len(jit_calls)} launches did not go direct"
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(a, b), name


@gpu
@needs_cuda
def test_direct_launches_under_cuda_graph_capture():
    import accel_torch

    x = torch.randn(64, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5120, device="cuda", dtype=torch.bfloat16)
    accel_torch.rmsnorm(x, w)  # compiled and cached before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = accel_torch.rmsnorm(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, accel_torch.rmsnorm(x, w))


@gpu
@needs_cuda
def test_launch_hooks_still_run():
    from triton import knobs

    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    launch.rmsnorm_fwd_launch(x, None, None, 1e-6, 0.0, False, None)  # cached: direct next
    names = []

    def hook(metadata):
        names.append(metadata.get()["name"] if hasattr(metadata, "get") else metadata["name"])

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        launch.rmsnorm_fwd_launch(x, None, None, 1e-6, 0.0, False, None)
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    assert names and "rmsnorm_fwd_kernel" in names[0]


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_inputs_device_not_the_current_one():
    import accel_torch

    x = torch.randn(64, 4096, device="cuda:1", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(1):
        expected = accel_torch.rmsnorm(x, w)
    with torch.cuda.device(0):
        for _ in range(2):  # the second call launches directly
            got = accel_torch.rmsnorm(x, w)
            assert got.device == x.device and torch.equal(got, expected)
