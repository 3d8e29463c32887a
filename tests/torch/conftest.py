import pytest

import accel_torch


@pytest.fixture
def torch_fallback():
    """Run the test with CPU tensors on the plain-torch path instead of interpreted kernels."""
    previous = accel_torch.interpret_enabled()
    accel_torch.set_interpret(False)
    yield
    if previous:
        accel_torch.set_interpret(True)


needs_interpreter = pytest.mark.skipif(
    not accel_torch.interpret_enabled(),
    reason="runs the kernels on CPU tensors: needs ACCEL_INTERPRET=1",
)


@pytest.fixture(params=["kernels", "fallback"])
def path(request):
    """Run on the interpreted kernels, then on the plain-torch fallback."""
    if request.param == "kernels":
        if not accel_torch.interpret_enabled():
            pytest.skip("needs ACCEL_INTERPRET=1")
        yield request.param
        return
    previous = accel_torch.interpret_enabled()
    accel_torch.set_interpret(False)
    yield request.param
    if previous:
        accel_torch.set_interpret(True)
