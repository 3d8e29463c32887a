"""Turns the results dictionary into a stdout table, a markdown file, JSON and a PNG plot.

Tables: one block per op with rows = shapes and columns = implementations; each time
cell reads ``us (share%)`` where share is the same-bytes copy's time over the op's time
(100% = as fast as copying the bytes the op must move). Speed-ups are torch eager's time
(resp. the fastest other peer of the same framework) divided by the implementation's time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.metrics import median

SCHEMA_VERSION = 1
TOP_KEYS = {
    "schema": str,
    "schema_version": int,
    "date": str,
    "device": dict,
    "versions": dict,
    "dtype": str,
    "eps": float,
    "quick": bool,
    "shapes": list,
    "ops": list,
    "op_titles": dict,
    "timing": dict,
    "copy_bandwidth": dict,
    "impls": list,
    "floors": list,
    "records": list,
    "host_overhead": list,
    "notes": list,
}
NUM = (int, float, type(None))
RECORD_KEYS = {
    "impl": str,
    "label": str,
    "framework": str,
    "project": bool,
    "op": str,
    "shape": str,
    "rows": int,
    "hidden": int,
    "dtype": str,
    "bytes": int,
    "status": str,
    "reason": (str, type(None)),
    "cold_us": NUM,
    "warm_us": NUM,
    "cold_gbps": NUM,
    "warm_gbps": NUM,
    "cold_copy_share": NUM,
    "warm_copy_share": NUM,
    "cold_big_copy_share": NUM,
    "warm_big_copy_share": NUM,
    "cold_vs_torch_eager": NUM,
    "warm_vs_torch_eager": NUM,
    "cold_vs_best_peer": NUM,
    "warm_vs_best_peer": NUM,
    "cold_best_peer": (str, type(None)),
    "warm_best_peer": (str, type(None)),
    "peak_mem_bytes": NUM,
    "first_call_s": NUM,
    "kernels": (list, type(None)),
    "notes": list,
}
FLOOR_KEYS = {
    "framework": str,
    "shape": str,
    "op": str,
    "bytes": int,
    "cold_us": NUM,
    "warm_us": NUM,
}
HOST_KEYS = {
    "impl": str,
    "framework": str,
    "op": str,
    "shape": str,
    "calls": int,
    "us_per_call": NUM,
    "status": str,
}
VERSION_KEYS = ("python", "torch", "triton", "jax", "jaxlib", "flax", "liger_kernel")
STATUSES = ("ok", "missing", "error")


def validate(results: dict) -> list[str]:
    """Problems with ``results`` against the JSON schema above; empty when it conforms."""
    problems = []

    def check(obj: dict, keys: dict, where: str) -> None:
        for key, typ in keys.items():
            if key not in obj:
                problems.append(f"{where}: missing {key!r}")
            elif not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
                problems.append(f"{where}: {key!r} is {type(obj[key]).__name__}")

    check(results, TOP_KEYS, "top")
    if problems:
        return problems
    if results["schema_version"] != SCHEMA_VERSION:
        problems.append(f"top: schema_version {results['schema_version']} != {SCHEMA_VERSION}")
    for key in VERSION_KEYS:
        if key not in results["versions"]:
            problems.append(f"versions: missing {key!r}")
    for key in ("kind", "name"):
        if key not in results["device"]:
            problems.append(f"device: missing {key!r}")
    for i, rec in enumerate(results["records"]):
        check(rec, RECORD_KEYS, f"records[{i}]")
        if rec.get("status") not in STATUSES:
            problems.append(f"records[{i}]: status {rec.get('status')!r}")
        elif rec["status"] != "ok" and not rec.get("reason"):
            problems.append(f"records[{i}]: status {rec['status']} without a reason")
    for i, floor in enumerate(results["floors"]):
        check(floor, FLOOR_KEYS, f"floors[{i}]")
    for i, row in enumerate(results["host_overhead"]):
        check(row, HOST_KEYS, f"host_overhead[{i}]")
    return problems


# ------------------------------------------------------------------------------ tables


def _columns(results: dict) -> list[dict]:
    """Implementations with at least one timed record, in registry order."""
    timed = {r["impl"] for r in results["records"] if r["status"] == "ok"}
    return [d for d in results["impls"] if d["name"] in timed]


def _cell(results: dict, shape: str, op: str, impl: str) -> dict | None:
    for r in results["records"]:
        if r["shape"] == shape and r["op"] == op and r["impl"] == impl:
            return r
    return None


def _floor(results: dict, shape: str, op: str, framework: str) -> dict | None:
    for f in results["floors"]:
        if f["shape"] == shape and f["op"] == op and f["framework"] == framework:
            return f
    return None


def _fmt_us(us, share) -> str:
    if us is None:
        return "-"
    text = f"{us:.1f}" if us < 1000 else f"{us:.0f}"
    return f"{text} ({100 * share:.0f}%)" if share is not None else text


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _status_cell(rec: dict | None) -> str | None:
    if rec is None or rec["status"] == "missing":
        return "-"
    if rec["status"] == "error":
        return "error"
    return None


def _frameworks(results: dict) -> list[str]:
    return [fw for fw in ("torch", "jax") if any(f["framework"] == fw for f in results["floors"])]


def time_table(results: dict, op: str, mode: str) -> tuple[list[str], list[list[str]]]:
    """Rows = shapes; columns = same-bytes copy per framework, then each implementation."""
    cols, fws = _columns(results), _frameworks(results)
    header = ["shape", "MB moved"] + [f"copy ({fw})" for fw in fws] + [c["label"] for c in cols]
    rows = []
    for shape in results["shapes"]:
        recs = [_cell(results, shape, op, c["name"]) for c in cols]
        nbytes = next((r["bytes"] for r in recs if r), None)
        row = [shape, "-" if nbytes is None else f"{nbytes / 1e6:.1f}"]
        for fw in fws:
            floor = _floor(results, shape, op, fw)
            row.append(_fmt_us(floor.get(f"{mode}_us") if floor else None, None))
        for rec in recs:
            status = _status_cell(rec)
            row.append(status or _fmt_us(rec[f"{mode}_us"], rec[f"{mode}_copy_share"]))
        rows.append(row)
    return header, rows


def _impl_table(results: dict, op: str, cell) -> tuple[list[str], list[list[str]]]:
    """Rows = shapes, columns = implementations; ``cell(rec)`` formats a record that ran."""
    cols = _columns(results)
    header = ["shape"] + [c["label"] for c in cols]
    rows = []
    for shape in results["shapes"]:
        recs = [_cell(results, shape, op, c["name"]) for c in cols]
        rows.append([shape] + [_status_cell(rec) or cell(rec) for rec in recs])
    return header, rows


def gbps_table(results: dict, op: str, mode: str) -> tuple[list[str], list[list[str]]]:
    """Rows = shapes; cells ``GB/s (share of the 1 GiB copy's bandwidth)``."""

    def cell(rec):
        if rec[f"{mode}_gbps"] is None:
            return "-"
        share = rec[f"{mode}_big_copy_share"]
        pct = f" ({100 * share:.0f}%)" if share is not None else ""
        return f"{rec[f'{mode}_gbps']:.0f}{pct}"

    return _impl_table(results, op, cell)


def speedup_table(results: dict, op: str, mode: str) -> tuple[list[str], list[list[str]]]:
    """Rows = shapes; cells ``vs torch eager / vs best peer`` speed-ups."""

    def cell(rec):
        a, b = rec[f"{mode}_vs_torch_eager"], rec[f"{mode}_vs_best_peer"]
        return f"{_fmt_x(a)} / {_fmt_x(b)}"

    return _impl_table(results, op, cell)


def memory_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = shapes; cells = peak MiB of one forward+backward above its inputs."""
    cols = _columns(results)
    header = ["shape"] + [c["label"] for c in cols]
    rows = []
    for shape in results["shapes"]:
        row = [shape]
        for c in cols:
            rec = _cell(results, shape, "fwdbwd", c["name"])
            peak = rec.get("peak_mem_bytes") if rec and rec["status"] == "ok" else None
            row.append("n/a" if peak is None else f"{peak / 2**20:.0f}")
        rows.append(row)
    return header, rows


def host_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = ops; cells = CPU us per call at the host-overhead shape."""
    names = [
        d for d in results["impls"] if any(h["impl"] == d["name"] for h in results["host_overhead"])
    ]
    header = ["op"] + [d["label"] for d in names]
    rows = []
    for op in results["ops"]:
        row = [op]
        for d in names:
            h = next(
                (h for h in results["host_overhead"] if h["op"] == op and h["impl"] == d["name"]),
                None,
            )
            if h is None or h["us_per_call"] is None:
                row.append("-" if h is None else "error")
            else:
                row.append(f"{h['us_per_call']:.1f}")
        rows.append(row)
    return header, rows


def first_call_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = ops; cells = median over shapes of the first call's seconds (compile, JIT)."""
    cols = _columns(results)
    header = ["op"] + [c["label"] for c in cols]
    rows = []
    for op in results["ops"]:
        row = [op]
        for c in cols:
            secs = [
                r["first_call_s"]
                for r in results["records"]
                if r["op"] == op and r["impl"] == c["name"] and r["first_call_s"] is not None
            ]
            row.append(f"{median(secs):.2f}" if secs else "-")
        rows.append(row)
    return header, rows


def render_text(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]

    def line(cells):
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join(parts)

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    """GitHub markdown table."""
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _modes(results: dict) -> list[str]:
    on_gpu = results["device"]["kind"] == "cuda"
    return ["cold", "warm"] if on_gpu else ["warm"]


def _mode_title(results: dict, mode: str) -> str:
    if results["device"]["kind"] != "cuda":
        return "CPU wall-clock us (median), caches not flushed"
    return {"cold": "cold us (L2 flushed)", "warm": "warm us (CUDA-graph replay / L2-resident)"}[
        mode
    ]


def _header_lines(results: dict) -> list[str]:
    dev, v = results["device"], results["versions"]
    bw = results["copy_bandwidth"]
    lines = [
        f"RMSNorm benchmark on {dev['name']} ({dev['kind']}), dtype {results['dtype']}, "
        f"{results['date']}",
        "versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]),
    ]
    if bw.get("gbps"):
        lines.append(
            f"reference copy: {bw['buffer_bytes'] >> 20} MiB buffer copied in "
            f"{bw['us']:.1f} us = {bw['gbps']:.0f} GB/s"
        )
    lines += results["notes"]
    return lines


def _missing_lines(results: dict) -> list[str]:
    lines = [f"missing: {d['name']}: {d['reason']}" for d in results["impls"] if not d["available"]]
    seen = set()
    for r in results["records"]:
        if r["status"] == "error" or (
            r["status"] == "missing"
            and r["reason"]
            and all(d["available"] for d in results["impls"] if d["name"] == r["impl"])
        ):
            key = (r["impl"], r["op"], r["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"{r['status']}: {r['impl']} {r['op']} ({r['shape']}): {r['reason']}")
        elif r["status"] == "ok":
            lines += [f"note: {r['impl']} {r['op']} ({r['shape']}): {n}" for n in r["notes"]]
    return lines


def _kernel_lines(results: dict) -> list[str]:
    first = results["shapes"][0] if results["shapes"] else None
    return [
        f"- {r['impl']} {r['op']}: {', '.join(r['kernels'])}"
        for r in results["records"]
        if r["shape"] == first and r["kernels"]
    ]


def text_report(results: dict) -> str:
    """The stdout report: per op, time tables (cold and warm) and speed-ups."""
    out = _header_lines(results)
    for op in results["ops"]:
        title = results["op_titles"][op]
        for mode in _modes(results):
            out += [
                "",
                f"== {op}: {title} -- {_mode_title(results, mode)}; "
                "(%) = same-bytes copy time / op time",
            ]
            out.append(render_text(*time_table(results, op, mode)))
        mode = _modes(results)[0]
        out += ["", f"== {op}: speed-up ({mode}) vs torch eager / vs best peer of the framework"]
        out.append(render_text(*speedup_table(results, op, mode)))
    if "fwdbwd" in results["ops"]:
        out += ["", "== peak memory of forward+backward, MiB above the inputs"]
        out.append(render_text(*memory_table(results)))
    if results["host_overhead"]:
        out += ["", "== host overhead: CPU us per call at 1x4096 (eager torch / jitted JAX)"]
        out.append(render_text(*host_table(results)))
    out += ["", "== first call, s (compilation / JIT included), median over shapes"]
    out.append(render_text(*first_call_table(results)))
    missing = _missing_lines(results)
    if missing:
        out += [""] + missing
    return "\n".join(out)


def markdown_report(results: dict) -> str:
    """The markdown results file: every table of the text report plus GB/s tables."""
    out = ["# RMSNorm benchmark results", ""] + [f"- {line}" for line in _header_lines(results)]
    out += ["", "Timing:", ""] + [f"- {k}: {v}" for k, v in results["timing"].items() if v]
    for op in results["ops"]:
        title = results["op_titles"][op]
        out += ["", f"## {op}: {title}"]
        for mode in _modes(results):
            out += ["", f"{_mode_title(results, mode)}; (%) = same-bytes copy time / op time", ""]
            out.append(render_markdown(*time_table(results, op, mode)))
            out += ["", f"GB/s ({mode}); (%) = share of the reference copy bandwidth", ""]
            out.append(render_markdown(*gbps_table(results, op, mode)))
            out += ["", f"Speed-up ({mode}): vs torch eager / vs best peer of the framework", ""]
            out.append(render_markdown(*speedup_table(results, op, mode)))
    if "fwdbwd" in results["ops"]:
        out += ["", "## Peak memory of forward+backward (MiB above the inputs)", ""]
        out.append(render_markdown(*memory_table(results)))
    if results["host_overhead"]:
        out += ["", "## Host overhead (CPU us per call at 1x4096)", ""]
        out.append(render_markdown(*host_table(results)))
    out += ["", "## First call, s (compilation / JIT included), median over shapes", ""]
    out.append(render_markdown(*first_call_table(results)))
    kernels = _kernel_lines(results)
    if kernels:
        out += ["", "## JAX kernels per call (CUPTI, first shape)", ""] + kernels
    missing = _missing_lines(results)
    if missing:
        out += ["", "## Missing or failed", ""] + [f"- {line}" for line in missing]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------- files


def plot(results: dict, path: Path) -> None:
    """PNG: one panel per op, % of the same-bytes copy per implementation across shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops, shapes, cols = results["ops"], results["shapes"], _columns(results)
    modes = _modes(results)
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    names = [d["name"] for d in results["impls"]]
    for ax, op in zip(axes[0], ops, strict=False):
        for c in cols:
            color = colors(names.index(c["name"]) % 10)
            for mode, style in zip(modes, ("-", "--"), strict=False):
                pts = [
                    (i, r[f"{mode}_copy_share"])
                    for i, s in enumerate(shapes)
                    if (r := _cell(results, s, op, c["name"]))
                    and r["status"] == "ok"
                    and r[f"{mode}_copy_share"] is not None
                ]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=False)
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    style,
                    marker="o",
                    color=color,
                    linewidth=2.2 if c["project"] else 1.2,
                    label=c["label"] if mode == modes[0] else None,
                )
        ax.axhline(100, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{op}: {results['op_titles'][op]}", fontsize=10)
        ax.set_ylabel("% of same-bytes copy bandwidth")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    how = (
        "solid: cold (L2 flushed), dashed: warm (L2-resident)"
        if len(modes) == 2
        else "CPU wall-clock, not kernel numbers"
    )
    fig.suptitle(f"RMSNorm, {results['dtype']}, {results['device']['name']} -- {how}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _finite(obj):
    """A copy of ``obj`` with NaN / inf floats as None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write JSON, markdown and PNG into ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"rmsnorm_{results['dtype']}"
    paths = {
        "json": out_dir / f"{stem}.json",
        "markdown": out_dir / f"{stem}.md",
        "png": out_dir / f"{stem}.png",
    }
    paths["json"].write_text(json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_report(results))
    plot(results, paths["png"])
    return paths
