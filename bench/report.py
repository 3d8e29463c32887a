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


HOST_TITLE = "Host overhead (CPU us per call at 1x4096)"
FIRST_CALL_TITLE = "First call, s (compilation / JIT included), median over shapes"
SHARE = (
    "(%) = the framework's own same-bytes copy time / op time "
    "(torch columns against copy (torch), JAX columns against copy (jax))"
)
# On a CPU the two copies are timed through different dispatch paths (JAX's copy is a
# jitted call, tens of us even for a few KB), so a torch % and a JAX % measure different things.
CPU_SHARE = (
    "on a CPU the two copies differ (JAX's includes a jitted call's dispatch), "
    "so compare % within one framework only"
)
NO_PEAK_ON_CPU = (
    "n/a: torch measures a call's peak memory only on CUDA (torch.cuda.max_memory_allocated); "
    "a CPU has no such counter"
)


def modes(results: dict) -> list[str]:
    """Timing modes of a run: cold and warm on CUDA, one wall-clock time ("warm") on a CPU."""
    on_gpu = results["device"]["kind"] == "cuda"
    return ["cold", "warm"] if on_gpu else ["warm"]


def _mode_title(results: dict, mode: str) -> str:
    if results["device"]["kind"] != "cuda":
        return "CPU wall-clock us (median), caches not flushed"
    return {"cold": "cold us (L2 flushed)", "warm": "warm us (CUDA-graph replay / L2-resident)"}[
        mode
    ]


def time_caption(results: dict, mode: str) -> str:
    """What a time table's cells are: the timing mode and what its (%) is a share of."""
    caption = f"{_mode_title(results, mode)}; {SHARE}"
    return caption if results["device"]["kind"] == "cuda" else f"{caption}; {CPU_SHARE}"


def memory_caption(results: dict) -> str:
    """What the peak-memory table's cells are, and why torch's are n/a off CUDA."""
    caption = "peak memory of forward+backward, MiB above the inputs"
    return caption if results["device"]["kind"] == "cuda" else f"{caption}; {NO_PEAK_ON_CPU}"


def header_lines(results: dict) -> list[str]:
    """The run's header: device, dtype, date, versions, the reference copy, the run's notes."""
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


def op_note_lines(results: dict) -> list[str]:
    """Where an implementation that ran computes an op differently from the contract."""
    return [
        f"differs: {d['name']} {op}: {note}"
        for d in results["impls"]
        if d["available"]
        for op, note in d.get("op_notes", {}).items()
        if op in results["ops"]
    ]


def _impl_lines(results: dict) -> list[str]:
    """Markdown list: each implementation, what it is, how it differs, why it is missing."""
    out = []
    for d in results["impls"]:
        out.append(f"- `{d['name']}` ({d['label']}, {d['framework']}): {d['description']}")
        out += [
            f"  - differs ({op}): {note}"
            for op, note in d.get("op_notes", {}).items()
            if op in results["ops"]
        ]
        if not d["available"]:
            out.append(f"  - missing: {d['reason']}")
    return out


def _kernel_lines(results: dict) -> list[str]:
    first = results["shapes"][0] if results["shapes"] else None
    return [
        f"- {r['impl']} {r['op']}: {', '.join(r['kernels'])}"
        for r in results["records"]
        if r["shape"] == first and r["kernels"]
    ]


def text_report(results: dict, omit_notes: tuple[str, ...] = ()) -> str:
    """The stdout report: per op, time tables (cold and warm) and speed-ups.

    ``omit_notes``: notes of the run already printed (e.g. at its start), left out here.
    """
    out = [line for line in header_lines(results) if line not in omit_notes]
    for op in results["ops"]:
        title = results["op_titles"][op]
        for mode in modes(results):
            out += ["", f"== {op}: {title} -- {time_caption(results, mode)}"]
            out.append(render_text(*time_table(results, op, mode)))
        mode = modes(results)[0]
        out += ["", f"== {op}: speed-up ({mode}) vs torch eager / vs best peer of the framework"]
        out.append(render_text(*speedup_table(results, op, mode)))
    if "fwdbwd" in results["ops"]:
        out += ["", f"== {memory_caption(results)}"]
        out.append(render_text(*memory_table(results)))
    if results["host_overhead"]:
        out += ["", "== host overhead: CPU us per call at 1x4096 (eager torch / jitted JAX)"]
        out.append(render_text(*host_table(results)))
    out += ["", f"== {FIRST_CALL_TITLE.lower()}"]
    out.append(render_text(*first_call_table(results)))
    missing = op_note_lines(results) + _missing_lines(results)
    if missing:
        out += [""] + missing
    return "\n".join(out)


def markdown_report(results: dict) -> str:
    """The markdown results file: every table of the text report plus GB/s tables."""
    out = ["# RMSNorm benchmark results", ""] + [f"- {line}" for line in header_lines(results)]
    out += ["", "Timing:", ""] + [f"- {k}: {v}" for k, v in results["timing"].items() if v]
    out += ["", "## Implementations", ""] + _impl_lines(results)
    for op in results["ops"]:
        title = results["op_titles"][op]
        out += ["", f"## {op}: {title}"]
        for mode in modes(results):
            out += ["", time_caption(results, mode), ""]
            out.append(render_markdown(*time_table(results, op, mode)))
            out += ["", f"GB/s ({mode}); (%) = share of the reference copy bandwidth", ""]
            out.append(render_markdown(*gbps_table(results, op, mode)))
            out += ["", f"Speed-up ({mode}): vs torch eager / vs best peer of the framework", ""]
            out.append(render_markdown(*speedup_table(results, op, mode)))
    if "fwdbwd" in results["ops"]:
        out += ["", "## Peak memory of forward+backward (MiB above the inputs)", ""]
        if results["device"]["kind"] != "cuda":
            out += [NO_PEAK_ON_CPU, ""]
        out.append(render_markdown(*memory_table(results)))
    if results["host_overhead"]:
        out += ["", f"## {HOST_TITLE}", ""]
        out.append(render_markdown(*host_table(results)))
    out += ["", f"## {FIRST_CALL_TITLE}", ""]
    out.append(render_markdown(*first_call_table(results)))
    kernels = _kernel_lines(results)
    if kernels:
        out += ["", "## JAX kernels per call (CUPTI, first shape)", ""] + kernels
    missing = _missing_lines(results)
    if missing:
        out += ["", "## Missing or failed", ""] + [f"- {line}" for line in missing]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------- files


def plot_series(results: dict, op: str, mode: str) -> dict[str, list]:
    """The plot's bars for one op and mode: per framework, ours and its best peer, per shape.

    Returns ``{label: [(share or None, peer label or None) per shape]}``, labels in the order
    "accel_torch", "best torch peer", "accel_jax", "best jax peer" (those that ran). The
    best peer is, per shape, the fastest implementation of the same framework that is not
    this project's; share is the same-bytes copy's time over the op's time.
    """
    out: dict[str, list] = {}
    for fw in _frameworks(results):
        ours = [d for d in results["impls"] if d["framework"] == fw and d["project"]]
        peers = [d for d in results["impls"] if d["framework"] == fw and not d["project"]]
        mine, best_peer = [], []
        for shape in results["shapes"]:
            recs = [_cell(results, shape, op, d["name"]) for d in ours]
            rec = next((r for r in recs if r and r["status"] == "ok"), None)
            mine.append((rec[f"{mode}_copy_share"] if rec else None, None))
            timed = [
                r
                for d in peers
                if (r := _cell(results, shape, op, d["name"]))
                and r["status"] == "ok"
                and r[f"{mode}_us"] is not None
            ]
            fastest = min(timed, key=lambda r: r[f"{mode}_us"], default=None)
            best_peer.append(
                (fastest[f"{mode}_copy_share"], fastest["label"]) if fastest else (None, None)
            )
        if ours and any(v is not None for v, _ in mine):
            out[ours[0]["label"]] = mine
        if any(v is not None for v, _ in best_peer):
            out[f"best {fw} peer"] = best_peer
    return out


def figure(results: dict):
    """The results figure: a row of panels per op, a panel per timing mode, bars per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops, shapes, mode_list = results["ops"], results["shapes"], modes(results)
    fig, axes = plt.subplots(
        len(ops),
        len(mode_list),
        figsize=(max(6.0, 0.8 * len(shapes) + 2) * len(mode_list), 3.6 * len(ops)),
        squeeze=False,
    )
    colors = {"torch": ("#d62728", "#f4a3a3"), "jax": ("#1f77b4", "#a6c8e6")}
    for row, op in zip(axes, ops, strict=True):
        for ax, mode in zip(row, mode_list, strict=True):
            series = plot_series(results, op, mode)
            width = 0.8 / max(1, len(series))
            for k, (label, values) in enumerate(series.items()):
                fw = "jax" if "jax" in label else "torch"
                color = colors[fw][0 if label.startswith("accel") else 1]
                xs = [i - 0.4 + (k + 0.5) * width for i in range(len(shapes))]
                ys = [100 * v if v is not None else 0.0 for v, _ in values]
                ax.bar(xs, ys, width, color=color, label=label)
                for x, y, (_, peer) in zip(xs, ys, values, strict=True):
                    if peer and y > 0:  # name the peer that was fastest at this shape
                        ax.text(x, 2, peer, rotation=90, ha="center", va="bottom", fontsize=6)
            ax.axhline(100, color="black", linewidth=1.0, linestyle="--", label="same-bytes copy")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel("shape (rows x hidden)")
            ax.set_ylabel(f"% of same-bytes copy ({mode})")
            ax.set_title(
                f"{op}: {results['op_titles'][op]} ({_mode_title(results, mode)})", fontsize=9
            )
            ax.set_ylim(bottom=0)
            ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.02, 0.0))
    note = "" if results["device"]["kind"] == "cuda" else " (CPU wall-clock, not kernel numbers)"
    fig.suptitle(
        f"RMSNorm, {results['dtype']}, {results['device']['name']}{note}: each framework's "
        "kernels and its fastest peer, as % of that framework's same-bytes copy",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    """Write :func:`figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
