"""Launch compiled Triton kernels with little host time.

``kernel[grid](*args, **constexprs)`` binds and specializes every argument and builds a cache
key from them on every call: tens of microseconds for a kernel of twenty arguments, which is
most of what a one-row RMSNorm costs. A :class:`Launcher` pays that once per specialization:
the first call of each goes through ``kernel[grid]`` (compiling if needed) and keeps the
compiled kernel under a key of everything Triton specializes on; later calls hand their
arguments to that compiled kernel's launcher directly, as Triton's own ``run`` does last.

The key: the constexprs and num_warps, the current device, each tensor's dtype and whether
its address is a multiple of 16 bytes, and for each int whether it is 1, whether it is a
multiple of 16 and its integer type (i32 / i64 / u64). Floats are never specialized. With
the same key Triton would pick the same compiled kernel, so a direct launch never runs a
kernel compiled for other inputs (``tests/torch/test_launcher.py`` checks the key against
Triton's specialization). Triton's interpreter, and launch hooks (profilers), always take
``kernel[grid]``. Kernels run on the first tensor's device, whichever device is current.
"""

import inspect

import torch
import triton
import triton.language as tl

try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: no direct launches
    _knobs = None

_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


def int_class(v: int) -> int:
    """What Triton specializes an int argument on, as one small int: 1 (a constant), or its
    type (i32 / i64 / u64) and whether it is a multiple of 16."""
    if v == 1:
        return 1
    kind = 0 if _I32_MIN <= v <= _I32_MAX else 4 if v <= _I64_MAX else 8
    return kind + 2 * (v % 16 == 0)


def tensor_class(t: torch.Tensor) -> tuple:
    """What Triton specializes a tensor argument on: its dtype and 16-byte alignment."""
    return t.dtype, t.data_ptr() % 16 == 0


def _hooked() -> bool:
    """True when a launch hook (a profiler such as proton) is installed: Triton must run it."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if getattr(hook, "calls", hook):  # a HookChain with calls, or a plain hook
            return True
    return False


def _direct_capable(kernel) -> bool:
    return _knobs is not None and isinstance(kernel, triton.runtime.JITFunction)


class Launcher:
    """A @triton.jit kernel whose parameters are tensors, then ints, then floats, then
    constexprs (in that order), called as ``launcher(grid, tensors, ints, floats, constexprs,
    num_warps)`` with a 1-D grid of ``grid`` programs."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.direct = _direct_capable(kernel)
        params = inspect.signature(kernel.fn).parameters.values()  # jit or interpreted
        self.constexpr_names = tuple(p.name for p in params if p.annotation is tl.constexpr)
        self.compiled: dict[tuple, tuple] = {}

    def key(self, tensors, ints, constexprs, num_warps) -> tuple:
        return (
            torch._C._cuda_getDevice(),
            constexprs,
            num_warps,
            tuple(map(tensor_class, tensors)),
            tuple(map(int_class, ints)),
        )

    def __call__(self, grid: int, tensors: tuple, ints: tuple, floats: tuple, constexprs: tuple,
                 num_warps: int) -> None:  # fmt: skip
        if not self.direct or not tensors[0].is_cuda:
            self.jit_launch(grid, tensors, ints, floats, constexprs, num_warps)
            return
        if tensors[0].get_device() != torch._C._cuda_getDevice():
            with torch.cuda.device(tensors[0].device):  # Triton launches on the current one
                self(grid, tensors, ints, floats, constexprs, num_warps)
            return
        key = self.key(tensors, ints, constexprs, num_warps)
        entry = self.compiled.get(key)
        if entry is None or _hooked():
            compiled = self.jit_launch(grid, tensors, ints, floats, constexprs, num_warps)
            if entry is None and compiled is not None:
                self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return
        run, function, metadata = entry
        stream = torch._C._cuda_getCurrentRawStream(key[0])
        run(grid, 1, 1, stream, function, metadata, None, None, None,
            *tensors, *ints, *floats, *constexprs)  # fmt: skip

    def jit_launch(self, grid, tensors, ints, floats, constexprs, num_warps):
        """Triton's own launch (compiling if needed); returns the compiled kernel."""
        return self.kernel[(grid,)](
            *tensors, *ints, *floats, **dict(zip(self.constexpr_names, constexprs, strict=True)),
            num_warps=num_warps,
        )  # fmt: skip
