"""Pure arithmetic of the benchmark: bandwidth, shares of the copy floor, speed-ups.

No framework imports here, so the math is testable anywhere. Times are microseconds,
bytes are bytes, bandwidths are GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def median(values: Iterable[float]) -> float:
    """Median of a non-empty sequence of numbers."""
    vals = list(values)
    if not vals:
        raise ValueError("median of no values")
    return float(statistics.median(vals))


def gbps(nbytes: float, us: float | None) -> float | None:
    """Bandwidth in GB/s of moving ``nbytes`` in ``us`` microseconds (None if no time)."""
    if us is None or us <= 0:
        return None
    return nbytes / us / 1e3


def copy_share(op_us: float | None, copy_us: float | None) -> float | None:
    """Fraction of the same-bytes copy's bandwidth an op reaches: ``copy_us / op_us``.

    1.0 means the op runs as fast as a plain copy of the bytes it must move; 0.5 means it
    takes twice as long. Same bytes, so the ratio of times is the ratio of bandwidths.
    """
    if op_us is None or copy_us is None or op_us <= 0:
        return None
    return copy_us / op_us


def bandwidth_share(nbytes: float, op_us: float | None, ref_gbps: float | None) -> float | None:
    """Fraction of a reference bandwidth (e.g. the 1 GiB copy's) an op reaches."""
    bw = gbps(nbytes, op_us)
    if bw is None or not ref_gbps:
        return None
    return bw / ref_gbps


def speedup(base_us: float | None, us: float | None) -> float | None:
    """How many times faster than the baseline: ``base_us / us`` (>1 is faster)."""
    if base_us is None or us is None or us <= 0:
        return None
    return base_us / us


def best(values: Sequence[tuple[str, float | None]]) -> tuple[str | None, float | None]:
    """The (name, time) with the smallest time among those that have one."""
    timed = [(n, t) for n, t in values if t is not None]
    if not timed:
        return None, None
    return min(timed, key=lambda nt: nt[1])


def derive(records: list[dict], floors: list[dict], ref_gbps: float | None) -> None:
    """Fill each timed record's bandwidths, shares and speed-ups, in place.

    Per record (cold and warm alike): ``*_gbps``; ``*_copy_share`` against the same-bytes
    copy of the same framework, shape and op; ``*_big_copy_share`` against ``ref_gbps`` (the
    1 GiB copy); ``*_vs_torch_eager`` (torch eager's time / this time, same shape and op);
    ``*_vs_best_peer`` against the fastest other peer of the same framework (this project's
    own kernels are never a peer) and ``*_best_peer`` naming it.
    """
    floor_of = {(f["framework"], f["shape"], f["op"]): f for f in floors}
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_cell.setdefault((r["shape"], r["op"]), []).append(r)
    for r in records:
        floor = floor_of.get((r["framework"], r["shape"], r["op"]), {})
        cell = by_cell[(r["shape"], r["op"])]
        eager = next((o for o in cell if o["impl"] == "torch_eager"), {})
        peers = [
            o
            for o in cell
            if o["framework"] == r["framework"] and not o["project"] and o["impl"] != r["impl"]
        ]
        for mode in ("cold", "warm"):
            us = r.get(f"{mode}_us")
            r[f"{mode}_gbps"] = gbps(r["bytes"], us)
            r[f"{mode}_copy_share"] = copy_share(us, floor.get(f"{mode}_us"))
            r[f"{mode}_big_copy_share"] = bandwidth_share(r["bytes"], us, ref_gbps)
            r[f"{mode}_vs_torch_eager"] = speedup(eager.get(f"{mode}_us"), us)
            name, peer_us = best([(o["impl"], o.get(f"{mode}_us")) for o in peers])
            r[f"{mode}_best_peer"] = name
            r[f"{mode}_vs_best_peer"] = speedup(peer_us, us)
