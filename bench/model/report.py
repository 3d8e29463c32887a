"""The model benchmark's results: a text report, markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "bench.model"
SCHEMA_VERSION = 1
GIB = 2**30
TOP_KERNELS = 6


def error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.2f}"


def _gib(v) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _vs_first(rec: dict, group: list[dict]) -> str:
    base = next((r for r in group if r.get("status") == "ok"), None)
    if base is None or rec.get("status") != "ok" or base is rec:
        return ""
    return f"{base['step_ms'] / rec['step_ms']:.3f}x"


def _rows(records: list[dict], part: str, key: str) -> list[list[str]]:
    rows = []
    recs = [r for r in records if r["part"] == part]
    for value in dict.fromkeys(r[key] for r in recs):
        group = [r for r in recs if r[key] == value]
        for r in group:
            prof = r.get("profile") or {}
            if r.get("status") != "ok":
                rows.append([str(value), r["label"], f"{r['status']}: {r.get('reason', '')}"])
                continue
            device_ms = prof.get("total_us")
            rows.append(
                [
                    str(value),
                    r["label"],
                    _ms(r["step_ms"]),
                    _vs_first(r, group),
                    _ms(None if device_ms is None else device_ms / 1e3),
                    _ms(None if prof.get("norm_us") is None else prof["norm_us"] / 1e3),
                    _pct(prof.get("share")),
                    _gib(r.get("peak_bytes")),
                    f"{r['loss']:.5f}" if "loss" in r else f"{r.get('logits_norm', 0):.3f}",
                ]
            )
    return rows


_COLUMNS = ["norm", "step ms", "speed-up", "device ms", "norm ms", "norm share", "peak GiB"]
HEADERS = {
    "train": ["layers", *_COLUMNS, "loss"],
    "decode": ["batch", *_COLUMNS, "|logits|"],
    "nnx": ["layers", *_COLUMNS, "loss"],
}
KEYS = {"train": "layers", "decode": "batch", "nnx": "layers"}


def _title(results: dict, part: str) -> str:
    c = results["config"]
    if part == "train":
        return (
            f"Training step (forward, loss, backward): HF Llama, batch 1, seq {c['seq']}, "
            f"{c['dtype']}"
        )
    if part == "decode":
        return (
            f"Decode step: HF Llama, {c['decode_layers']} layers, one new token per "
            f"sequence, {c['past']} cached tokens ({c['cache']} cache), {c['dtype']}"
        )
    return (
        f"Flax nnx transformer training step (loss, grads; jit), {c['nnx_layers']} "
        f"layers, batch 1, seq {c['seq']}, {c['dtype']}"
    )


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for row in rows:
            out.append("| " + " | ".join(row + [""] * (len(headers) - len(row))) + " |")
        return out
    widths = [
        max(len(h), *(len(r[i]) for r in rows if i < len(r) and len(r) == len(headers)))
        for i, h in enumerate(headers)
    ]
    fmt = lambda cells: "  ".join(
        c.rjust(w) if i else c.ljust(w)  # noqa: E731
        for i, (c, w) in enumerate(zip(cells, widths, strict=False))
    )
    return [fmt(headers)] + [fmt(r) for r in rows]


def _kernel_lines(records: list[dict], part: str) -> list[str]:
    """Per variant, the kernels counted as the norm's (first config only)."""
    lines, seen = [], set()
    for r in records:
        if r["part"] != part or r.get("status") != "ok" or r["variant"] in seen:
            continue
        seen.add(r["variant"])
        prof = r.get("profile") or {}
        if prof.get("note"):
            lines.append(f"- {r['label']}: {prof['note']}")
            continue
        kernels = list((prof.get("kernels") or {}).items())
        shown = ", ".join(
            f"{name[:70]} x{count:g} ({us:.0f} us)" for name, (count, us) in kernels[:TOP_KERNELS]
        )
        more = f", ... {len(kernels) - TOP_KERNELS} more" if len(kernels) > TOP_KERNELS else ""
        lines.append(f"- {r['label']}: {shown or 'none'}{more}")
    return lines


def render(results: dict, markdown: bool = False) -> str:
    """The results as text (``markdown=False``) or markdown tables."""
    h = "## " if markdown else ""
    dev = results["device"]
    out = [f"{'# ' if markdown else ''}Model benchmark on {dev['name']} ({dev['kind']})", ""]
    for note in results["notes"]:
        out.append(f"{'- ' if markdown else ''}{note}")
    for part in results["config"]["parts"]:
        rows = _rows(results["records"], part, KEYS[part])
        if not rows:
            continue
        out += ["", f"{h}{_title(results, part)}", ""]
        out += _table(HEADERS[part], rows, markdown)
        lines = _kernel_lines(results["records"], part)
        if lines:
            head = (
                "Norm kernels (by name):" if part == "nnx" else "Counted as the norm's, per step:"
            )
            out += ["", head, *lines]
    out += ["", f"{h}Methods", ""]
    out += [f"- {k}: {v}" for k, v in results["methods"].items()]
    return "\n".join(out) + "\n"


def write_all(results: dict, out: Path) -> dict[str, Path]:
    """Write ``model.json`` and ``model.md`` to ``out``; their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "model.json", "md": out / "model.md"}
    paths["json"].write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    paths["md"].write_text(render(results, markdown=True))
    return paths
