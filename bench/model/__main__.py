"""Command line: ``python -m bench.model [--layers 4,8] [--seq 4096] [--batches 1,8,64] ...``.

On a CUDA machine it runs the Llama-3-8B shape (training step at each ``--layers``, decode
step at each ``--batches``, the nnx training step) and writes ``model.json`` and
``model.md`` to ``bench/results/<card>/model/``. Without a GPU it runs a tiny shape in
seconds and writes to ``bench/results-cpu/model/`` (never into ``bench/results``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

# Before JAX is imported: share the GPU with torch instead of grabbing 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from bench.__main__ import output_dir  # noqa: E402
from bench.model import configs  # noqa: E402
from bench.model import report as report_mod  # noqa: E402

PARTS = ("train", "decode", "nnx")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"parts must be a subset of {','.join(PARTS)}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    gpu, cpu = configs.default_config(True), configs.default_config(False)
    d = lambda name: f"default {getattr(gpu, name)} on a GPU, {getattr(cpu, name)} on a CPU"  # noqa: E731
    p = argparse.ArgumentParser(
        prog="python -m bench.model",
        description="A Llama-3-8B-shaped HF Llama (training and decode steps) with HF's, "
        "accel_torch's and Liger's RMSNorm, and a Flax nnx transformer with flax's and "
        "accel_jax's: step time, peak memory, the norm's share of device time.",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the CPU's tiny shape and settings on any device (a quick check)",
    )
    p.add_argument("--layers", type=_ints, help=f"training-step layer counts ({d('layers')})")
    p.add_argument("--seq", type=_positive, help=f"training sequence length ({d('seq')})")
    p.add_argument("--decode-layers", type=_positive, help=f"({d('decode_layers')})")
    p.add_argument("--batches", type=_ints, help=f"decode batch sizes ({d('decode_batches')})")
    p.add_argument("--past", type=_positive, help=f"cached tokens per sequence ({d('past')})")
    p.add_argument("--nnx-layers", type=_positive, help=f"({d('nnx_layers')})")
    p.add_argument("--steps", type=_positive, help=f"timed steps ({d('steps')}; decode 3x)")
    p.add_argument("--warmup", type=int, help=f"untimed steps first ({d('warmup')}; decode 3x)")
    p.add_argument(
        "--cache",
        choices=["static", "dynamic"],
        default="static",
        help="decode KV cache: HF StaticCache (default) or DynamicCache",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        help=f"subset of {','.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: bench/results/<card>/"
        "model on a GPU, bench/results-cpu/model on a CPU)",
    )
    p.add_argument("--traces", type=Path, help="keep the profiler traces in this folder")
    return p


def make_config(args: argparse.Namespace, on_gpu: bool) -> configs.RunConfig:
    cfg = configs.default_config(on_gpu and not args.tiny)
    for arg, field in [
        ("layers", "layers"),
        ("seq", "seq"),
        ("decode_layers", "decode_layers"),
        ("batches", "decode_batches"),
        ("past", "past"),
        ("nnx_layers", "nnx_layers"),
        ("steps", "steps"),
        ("warmup", "warmup"),
    ]:
        if getattr(args, arg) is not None:
            setattr(cfg, field, getattr(args, arg))
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")
    cfg.cache, cfg.dtype, cfg.parts = args.cache, args.dtype, args.parts
    return cfg


def _versions() -> dict:
    from bench import runner

    out = runner.versions()
    out["transformers"] = runner._version("transformers")
    return out


def _nnx_missing(on_gpu: bool) -> str | None:
    try:
        import flax  # noqa: F401
        import jax
    except ImportError as e:
        return f"JAX/Flax not installed ({e})"
    if on_gpu and jax.default_backend() != "gpu":
        return f"torch sees a GPU but JAX runs on {jax.default_backend()} (install jax[cuda12])"
    return None


def run(cfg: configs.RunConfig, device: str, trace_dir: Path, log) -> list[dict]:
    # The nnx step first: its CUPTI timing cannot subscribe once torch's profiler has (CUPTI
    # takes one subscriber, and torch's profiler keeps its subscription).
    nnx_records = _run_nnx(cfg, device, log) if "nnx" in cfg.parts else []
    records = []
    if "train" in cfg.parts:
        from bench.model import train_torch

        records += train_torch.run(cfg, device, trace_dir, log)
    if "decode" in cfg.parts:
        from bench.model import decode_torch

        records += decode_torch.run(cfg, device, trace_dir, log)
    return records + nnx_records


def _run_nnx(cfg: configs.RunConfig, device: str, log) -> list[dict]:
    why = _nnx_missing(device == "cuda")
    if why is not None:
        return [
            dict(
                part="nnx", variant="all", label="nnx", layers=cfg.nnx_layers, status="missing",
                reason=why,
            )
        ]  # fmt: skip
    from bench.model import transformer_nnx

    records = transformer_nnx.run(cfg, log)
    gc.collect()
    return records


def methods() -> dict:
    from bench import jax_timing
    from bench.model import steps

    return {
        "torch step time": steps.EVENTS_METHOD,
        "torch peak memory": steps.PEAK_METHOD,
        "torch norm share": "torch.profiler trace of one training step (three decode steps), "
        "device time of the norm's kernels over all device time of the step: accel_torch's "
        "and Liger's by kernel name (their forward and backward kernels); HF's eager norm by "
        "the kernels launched inside record_function ranges around the norm modules' "
        "forwards: its forward only (ranges around its backward nodes also took in GEMMs of "
        "other nodes on CUDA, so its backward is not attributed)",
        "device ms": "the sum of the step's device event durations in that trace (no gaps)",
        "nnx step time": "CUPTI kernel records (mosaic.gpu.profiler.measure): the sum of the "
        "step's kernels, same inputs every step, median over steps",
        "nnx peak memory": jax_timing.PEAK_METHOD,
        "cpu": "without CUDA: " + steps.CPU_METHOD + "; tiny shape; not kernel numbers",
        "speed-up": "the first variant's step time over this one's",
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    try:
        cfg = make_config(args, on_gpu)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = "cuda" if on_gpu else "cpu"
    try:
        out = output_dir(args.out, on_gpu, "model")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bench import runner

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    notes = [] if on_gpu else [runner.NO_GPU_NOTE + " Tiny model shape."]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.traces or Path(tmp)
        trace_dir.mkdir(parents=True, exist_ok=True)
        records = run(cfg, device, trace_dir, log)
    results = {
        "schema": report_mod.SCHEMA,
        "schema_version": report_mod.SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": runner.device_info(),
        "versions": _versions(),
        "config": cfg.as_dict(),
        "methods": methods(),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 1),
        "records": records,
    }
    print(report_mod.render(results), flush=True)
    paths = report_mod.write_all(results, out)
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
