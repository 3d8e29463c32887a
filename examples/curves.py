"""What both examples share: their command line and the side-by-side report of two runs."""

from __future__ import annotations

import argparse
import json
import statistics


def parse_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--steps``, ``--batch``, ``--seq`` and ``--json`` (where to write the curves)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the two curves to this file")
    return p.parse_args(argv)


def report(
    names: tuple[str, str],
    losses: tuple[list[float], list[float]],
    seconds: tuple[list[float], list[float]],
    json_path: str | None = None,
    **extra,
) -> dict:
    """Print the reference's and ours' loss per step side by side and the time per step.

    ``names``, ``losses``, ``seconds``: (reference, ours). Returns (and with ``json_path``
    writes) ``{"reference": [...], "accel": [...], "reference_ms", "accel_ms", **extra}``.
    """
    width = [max(len(n), 9) for n in names]
    print(f"{'step':>4}  {names[0]:>{width[0]}}  {names[1]:>{width[1]}}  {'difference':>10}")
    for i, (a, b) in enumerate(zip(*losses, strict=True)):
        print(f"{i:>4}  {a:>{width[0]}.6f}  {b:>{width[1]}.6f}  {b - a:>10.2e}")
    # The first step compiles / warms up: the median of the others is the step time.
    ms = [1e3 * statistics.median(s[1:] or s) for s in seconds]
    print(f"time per step: {names[0]} {ms[0]:.1f} ms, {names[1]} {ms[1]:.1f} ms")
    result = {
        "reference": losses[0],
        "accel": losses[1],
        "reference_ms": ms[0],
        "accel_ms": ms[1],
        **extra,
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f)
    return result
