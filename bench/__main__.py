"""Command line: ``python -m bench [--dtype bf16] [--shapes 2048x4096,...] [--ops ...]``.

On a CUDA machine it times every implementation at the project's shapes and writes the
results to ``bench/results``. Without a GPU it says so, times the CPU paths at small
shapes (results to ``bench/results-cpu``, never over the committed GPU results) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Before JAX is imported anywhere: share the GPU with torch instead of grabbing 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from bench import impls as impls_mod  # noqa: E402
from bench.shapes import CPU_SHAPES, DTYPES, GPU_SHAPES, OPS, parse_ops, parse_shapes  # noqa: E402

HERE = Path(__file__).resolve().parent
GPU_OUT = HERE / "results"
CPU_OUT = HERE / "results-cpu"


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
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated subset of {','.join(impls_mod.BY_NAME)} (default: all)",
    )
    p.add_argument(
        "--out",
        default=None,
        type=Path,
        help="output folder (default: bench/results on GPU, bench/results-cpu on CPU)",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke runs)")
    p.add_argument(
        "--no-host-overhead",
        action="store_true",
        help="skip the per-call host overhead measurement",
    )
    return p


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

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print(
            "No CUDA GPU found: the kernels need CUDA. Timing the CPU paths instead "
            "(plain torch / jnp, small shapes, CPU wall-clock); these are not kernel numbers.",
            flush=True,
        )
    try:
        shapes = parse_shapes(shapes_arg or (GPU_SHAPES if on_gpu else CPU_SHAPES))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (GPU_OUT if on_gpu else CPU_OUT)
    if not on_gpu and out.resolve() == GPU_OUT:
        print(
            f"error: {out} holds the committed GPU results; a CPU run writes elsewhere (--out DIR)",
            file=sys.stderr,
        )
        return 2

    from bench import report, runner

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
    print(report.text_report(results), flush=True)
    paths = report.write_all(results, out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
