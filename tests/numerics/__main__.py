"""The parity report: ``python -m tests.numerics [--real-sizes | --all] [--out PATH]``.

Runs the case table through accel_torch and accel_jax (compiled kernels on a CUDA GPU,
interpreted kernels on the CPU) and prints, per case, the largest error of each half
against the float64 reference and against each other; exits 1 on any breach of a bound.
``--out`` writes the report as text and JSON (a directory gets ``<device>[_real].txt`` and
``.json``; a path ending in .txt or .json gets that one file).
"""

from __future__ import annotations

import os
import shutil
import sys


def _select_backend() -> None:
    # As tests/conftest.py: decided before torch, Triton or JAX are imported.
    has_cuda = shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")
    if not has_cuda:
        os.environ.setdefault("ACCEL_INTERPRET", "1")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


_select_backend()


def _require_both_frameworks() -> None:
    from importlib.util import find_spec

    # Exit with a sentence, not a traceback, where one framework is not installed.
    missing = [m for m in ("torch", "jax", "flax") if find_spec(m) is None]
    if missing:
        sys.exit(
            f"python -m tests.numerics compares accel_torch with accel_jax: it needs torch, "
            f"jax and flax; not installed: {', '.join(missing)}"
        )


_require_both_frameworks()

# accel_torch first: it sets TRITON_INTERPRET, which must precede any import of Triton.
import accel_torch  # noqa: E402, F401, I001

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .report import environment, render_json, render_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.numerics", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--real-sizes", action="store_true", help="the GPU sizes only")
    size.add_argument("--all", action="store_true", help="small cases and real sizes")
    p.add_argument("-k", "--cases", default="", help="only cases whose name contains this")
    p.add_argument("--out", default=None, help="directory, or a .txt / .json file")
    p.add_argument(
        "--fallback",
        action="store_true",
        help="CPU: interpretation off, so both packages run their reference math",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    args = p.parse_args(argv)

    import torch

    from .cases import CPU_CASES, REAL_CASES
    from .runner import default_device, run_case

    cases = REAL_CASES if args.real_sizes else CPU_CASES + (REAL_CASES if args.all else [])
    cases = [c for c in cases if args.cases in c.name]
    if args.list:
        for c in cases:
            print(f"{c.name:40s} {c.describe()}")
        return 0
    device = default_device()
    if args.fallback:
        import accel_jax

        accel_torch.set_interpret(False)
        accel_jax.set_interpret(False)
    if (args.real_sizes or args.all) and device.type != "cuda":
        print("--real-sizes needs a CUDA GPU (interpreted kernels would take hours)")
        return 2
    env = environment(device, real=args.real_sizes or args.all)
    results = []
    t0 = time.perf_counter()
    for case in cases:
        res = run_case(case, device)
        results.append(res)
        if not args.quiet:
            mark = "ok" if res.ok else "BREACH"
            print(
                f"[{len(results)}/{len(cases)}] {case.name}: {mark} ({res.seconds:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env["seconds"] = round(time.perf_counter() - t0, 1)
    text = render_text(results, env)
    print(text)
    if args.out:
        _write(Path(args.out), text, render_json(results, env), env, args.real_sizes or args.all)
    return 0 if all(r.ok for r in results) else 1


def _write(out: Path, text: str, js: str, env: dict, real: bool) -> None:
    if out.suffix in (".txt", ".json"):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(js if out.suffix == ".json" else text)
        return
    out.mkdir(parents=True, exist_ok=True)
    stem = ("gpu" if env["device_type"] == "cuda" else "cpu") + ("_real" if real else "")
    stem += "_fallback" if env["mode"].startswith("reference math") else ""
    (out / f"{stem}.txt").write_text(text)
    (out / f"{stem}.json").write_text(js)
    print(f"wrote {out / stem}.txt and .json", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
