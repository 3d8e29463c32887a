"""Command line: ``python -m bench [--dtype bf16] [--shapes 2048x4096,...] [--widths] [--ops ...]``.

On a CUDA machine it times every implementation at the project's shapes and writes the
results to ``bench/results/<card>/`` (e.g. ``bench/results/h200/``), so a run on one card
never overwrites another card's results. Without a GPU it says so once, times the CPU paths
at small shapes (results to ``bench/results-cpu``, never into ``bench/results``) and exits 0.

``--widths`` adds the hidden widths real models use, 4096 rows of 3072, 3584, 4608, 5120,
6144 and 7168 columns (``bench.shapes.WIDTH_SHAPES``), after the given (or default) shapes;
a shape already in the run is not run twice.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

# Before JAX is imported anywhere: share the GPU with torch instead of grabbing 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from bench import impls as impls_mod  # noqa: E402
from bench.shapes import (  # noqa: E402
    CPU_SHAPES,
    DTYPES,
    GPU_SHAPES,
    OPS,
    WIDTH_SHAPES,
    Shape,
    parse_ops,
    parse_shapes,
    unique_shapes,
)

HERE = Path(__file__).resolve().parent
GPU_OUT = HERE / "results"
CPU_OUT = HERE / "results-cpu"


def output_dir(out: Path | None, on_gpu: bool, sub: str = "") -> Path:
    """Where results go: ``out`` if given, else ``bench/results/<card>/<sub>`` on a GPU and
    ``bench/results-cpu/<sub>`` on a CPU. ValueError for a CPU run aimed at the committed
    GPU results."""
    if out is None:
        if on_gpu:
            import torch

            out = GPU_OUT / card_slug(torch.cuda.get_device_name(0))
        else:
            out = CPU_OUT
        out = out / sub if sub else out
    if not on_gpu and out.resolve().is_relative_to(GPU_OUT):
        raise ValueError(
            f"{out} is under {GPU_OUT.relative_to(HERE.parent)}, which holds the "
            "committed GPU results; a CPU run writes elsewhere (--out DIR)"
        )
    return out


def card_slug(device_name: str) -> str:
    """A folder name for a GPU: ``"NVIDIA H200"`` -> ``"h200"``, vendor prefix dropped."""
    name = re.sub(r"^\s*nvidia\s+", "", device_name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _impls_default_help() -> str:
    cpu_skipped = [i.name for i in impls_mod.REGISTRY if not i.cpu_default]
    cuda_only = [i.name for i in impls_mod.REGISTRY if i.needs_cuda]
    return (
        f"comma-separated subset of {','.join(impls_mod.BY_NAME)} (default: every installed "
        f"one; on a CPU {', '.join(cpu_skipped)} runs only when named here (slow to compile) "
        f"and {', '.join(cuda_only)} {'need' if len(cuda_only) > 1 else 'needs'} CUDA)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="RMSNorm benchmark: this project's kernels against the usual peers, "
        "each quoted against a same-bytes device copy.",
    )
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="default: bf16")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated MxN (rows x hidden), e.g. 2048x4096,256x4096; "
        f"default on GPU: {','.join(GPU_SHAPES)}; on CPU: {','.join(CPU_SHAPES)}",
    )
    p.add_argument(
        "--widths",
        action="store_true",
        help="also run the hidden widths real models use: "
        f"{', '.join(WIDTH_SHAPES)}, after the other shapes (each shape runs once)",
    )
    p.add_argument(
        "--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)} (default: all three)"
    )
    p.add_argument(
        "--impls",
        default=None,
        help=_impls_default_help(),
    )
    p.add_argument(
        "--out",
        default=None,
        type=Path,
        help="output folder (default: bench/results/<card>/ on a GPU, e.g. bench/results/h200; "
        "bench/results-cpu on a CPU)",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke runs)")
    p.add_argument(
        "--no-host-overhead",
        action="store_true",
        help="skip the per-call host overhead measurement",
    )
    return p


def run_shapes(shapes_arg: str | None, widths: bool, on_gpu: bool) -> list[Shape]:
    """The run's shapes: ``--shapes`` (or the GPU / CPU default), then ``--widths``'s, each once.

    Raises ValueError for a malformed ``--shapes``.
    """
    shapes = parse_shapes(shapes_arg or (GPU_SHAPES if on_gpu else CPU_SHAPES))
    return unique_shapes(shapes, parse_shapes(WIDTH_SHAPES) if widths else [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ops = parse_ops(args.ops)
        impls_mod.select(args.impls)
        shapes_arg = args.shapes
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from bench import report, runner

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print(runner.NO_GPU_NOTE, flush=True)  # once, before the run; not again in the report
    try:
        shapes = run_shapes(shapes_arg, args.widths, on_gpu)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = output_dir(args.out, on_gpu)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cfg = runner.Config(
        shapes=shapes,
        ops=ops,
        dtype=args.dtype,
        impls=args.impls,
        quick=args.quick,
        host_overhead=not args.no_host_overhead,
    )
    t0 = time.perf_counter()
    results = runner.run(cfg)
    print(report.text_report(results, omit_notes=(runner.NO_GPU_NOTE,)), flush=True)
    paths = report.write_all(results, out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
