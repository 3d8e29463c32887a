"""Which of a step's device time is the norm's: profiler ranges and their attribution.

``norm_ranges(norms)`` wraps, while a step runs, each norm module's forward in a
``record_function`` range named ``NORM_FWD`` and each autograd node that forward creates
(found by walking the output's graph back to the input's ``grad_fn``) in a range named
``NORM_BWD``, opened by a pre-hook and closed by a post-hook on that node, on the thread
that runs it. ``AccumulateGrad`` nodes are not walked: with the gradients set to None before
the step (as here) they launch no kernel.

``attribute(trace)`` reads a Chrome trace exported by ``torch.profiler``: a device event
(kernel, memcpy, memset) belongs to the norm when the runtime/driver call that launched it
(matched by its ``correlation`` id) lies inside a norm range on the same thread. So, for
Hugging Face's eager norm, its pow/mean/add/rsqrt/mul/copy kernels and their backward
kernels are counted; the residual adds around the norm (outside its module) are not.
"""

from __future__ import annotations

import bisect
import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

NORM_FWD = "bench_model::norm_forward"
NORM_BWD = "bench_model::norm_backward"
NORM_RANGES = (NORM_FWD, NORM_BWD)
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
MAX_NORM_NODES = 64  # a norm's forward makes at most ~10 autograd nodes
# Kernels that are the norm's by name (fused kernels: nothing else is called so). Variants
# without an entry (HF's eager norm) are attributed by the forward ranges only: on CUDA the
# backward-node ranges also took in GEMM kernels of other nodes (H200, torch 2.11).
NORM_KERNELS = {
    "accel": ("rmsnorm_fwd_kernel", "rmsnorm_bwd_kernel", "dweight_reduce_kernel"),
    "liger": ("_rms_norm_forward_kernel", "_rms_norm_backward_kernel"),
}


def _norm_nodes(output, inputs) -> list:
    """The autograd nodes between ``output`` and ``inputs`` (the nodes the norm created)."""
    stop = {id(t.grad_fn) for t in inputs if getattr(t, "grad_fn", None) is not None}
    todo, seen, nodes = [output.grad_fn], set(), []
    while todo:
        node = todo.pop()
        if node is None or id(node) in stop or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "AccumulateGrad":
            continue
        nodes.append(node)
        if len(nodes) > MAX_NORM_NODES:
            raise RuntimeError(f"a norm's graph has over {MAX_NORM_NODES} nodes: walk escaped")
        todo.extend(fn for fn, _ in node.next_functions)
    return nodes


def _range_hooks(node, name: str) -> None:
    import torch

    opened = []

    def enter(grad_outputs):
        rf = torch.autograd.profiler.record_function(name)
        rf.__enter__()
        opened.append(rf)

    def leave(grad_inputs, grad_outputs):
        if opened:
            opened.pop().__exit__(None, None, None)

    node.register_prehook(enter)
    node.register_hook(leave)


@contextlib.contextmanager
def norm_ranges(norms: Iterable) -> Iterator[None]:
    """While open, the norms' forwards and their backward nodes run inside profiler ranges
    (``NORM_FWD`` / ``NORM_BWD``). The node hooks die with the step's graph."""
    import torch

    opened: list = []
    handles = []

    def pre(module, args):
        rf = torch.autograd.profiler.record_function(NORM_FWD)
        rf.__enter__()
        opened.append(rf)

    def post(module, args, output):
        opened.pop().__exit__(None, None, None)
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            for node in _norm_nodes(out, [a for a in args if isinstance(a, torch.Tensor)]):
                _range_hooks(node, NORM_BWD)

    for m in norms:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def load_trace(path: str | Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace file."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


class _Ranges:
    """Norm ranges per (pid, tid), for 'does this timestamp lie in one' queries."""

    def __init__(self, events: list[dict], names: tuple[str, ...] = NORM_RANGES):
        self.by_thread: dict = {}
        for e in events:
            if e.get("cat") == "user_annotation" and e.get("name") in names:
                key = (e.get("pid"), e.get("tid"))
                self.by_thread.setdefault(key, []).append((float(e["ts"]), float(e["dur"])))
        for spans in self.by_thread.values():
            spans.sort()
        self.starts = {k: [s for s, _ in v] for k, v in self.by_thread.items()}
        self.count = sum(len(v) for v in self.by_thread.values())

    def contains(self, event: dict) -> bool:
        key = (event.get("pid"), event.get("tid"))
        spans = self.by_thread.get(key)
        if not spans:
            return False
        ts = float(event["ts"])
        i = bisect.bisect_right(self.starts[key], ts)
        # Ranges do not nest across norms; check the latest few that start before ts.
        return any(s <= ts <= s + d for s, d in spans[max(0, i - 4) : i])


def ops_in_norm(events: list[dict], cat: str = "cpu_op") -> list[str]:
    """Names of the events of category ``cat`` that start inside a norm range on their
    thread (on a CPU profile: the aten ops the norms ran)."""
    ranges = _Ranges(events)
    return [e["name"] for e in events if e.get("cat") == cat and ranges.contains(e)]


def attribute(
    events: list[dict],
    kernel_names: tuple[str, ...] | None = None,
    range_names: tuple[str, ...] = NORM_RANGES,
) -> dict:
    """The norm's share of the device time in a trace.

    A device event is the norm's when its name starts with one of ``kernel_names`` (when
    given), else when the call that launched it lies inside a range of ``range_names``.
    Returns ``total_us`` (all device events; None if the trace has none, as on a CPU),
    ``norm_us`` (the norm's), ``share``, ``kernels`` ({name: [count, us]} of the counted
    events, largest first), ``ranges`` (norm ranges found) and ``unmatched`` (device events
    whose launch was not found, counted in the total only).
    """
    ranges = _Ranges(events, range_names)
    launches = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    total = norm = 0.0
    unmatched = found = 0
    kernels: dict[str, list] = {}
    for e in events:
        if e.get("cat") not in DEVICE_CATS:
            continue
        dur = float(e.get("dur", 0.0))
        total += dur
        found += 1
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is None:
            unmatched += 1
        if kernel_names is not None:
            counted = e["name"].startswith(kernel_names)
        else:
            counted = launch is not None and ranges.contains(launch)
        if counted:
            norm += dur
            entry = kernels.setdefault(e["name"], [0, 0.0])
            entry[0] += 1
            entry[1] += dur
    ordered = dict(sorted(kernels.items(), key=lambda kv: -kv[1][1]))
    return {
        "total_us": total if found else None,
        "norm_us": norm if found else None,
        "share": norm / total if total > 0 else None,
        "kernels": {k: [c, round(us, 3)] for k, (c, us) in ordered.items()},
        "ranges": ranges.count,
        "unmatched": unmatched,
    }


def profile_norms(
    step, norms, trace_path: str | Path, steps: int = 1, variant: str | None = None
) -> dict:
    """Run ``step()`` ``steps`` times under torch.profiler (CPU and CUDA activity) with
    the norm ranges open; the attribution of the trace (times and counts per step: by kernel
    name for the variants of NORM_KERNELS, else by the forward ranges) and the names of the
    CPU ops run inside the norm ranges."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof, norm_ranges(norms):
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    events = load_trace(trace_path)
    names = NORM_KERNELS.get(variant)
    out = attribute(events, names, NORM_RANGES if names else (NORM_FWD,))
    out["method"] = "kernel names" if names else "forward ranges (backward not attributed)"
    if out["total_us"] is not None:
        out["total_us"] /= steps
        out["norm_us"] /= steps
    out["kernels"] = {k: [c / steps, round(us / steps, 3)] for k, (c, us) in out["kernels"].items()}
    out["ranges_per_step"] = out.pop("ranges") / steps
    out["norm_ops"] = sorted(set(ops_in_norm(events)))
    out["steps"] = steps
    return out
