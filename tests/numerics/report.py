"""Formatting the parity report: one table row per case, then breaches, waivers and notes."""

from __future__ import annotations

import json
import math
import platform

import torch

from .runner import FP32_REL, CaseResult, Check

# Table columns: (header, check-name suffixes); the cell shows the largest value among them.
COLUMNS = [
    ("y:T", ("torch y vs ref",)),
    ("y:J", ("jax y vs ref",)),
    ("y:TJ", ("torch vs jax y",)),
    ("h", ("torch h = round(x+r)", "jax h = round(x+r)", "torch vs jax h")),
    ("dx:T", ("torch dx vs ref",)),
    ("dx:J", ("jax dx vs ref",)),
    ("dx:TJ", ("torch vs jax dx",)),
    ("dr:T", ("torch dresidual vs ref",)),
    ("dr:J", ("jax dresidual vs ref",)),
    ("dr:TJ", ("torch vs jax dresidual",)),
    ("dw:T", ("torch dweight vs ref",)),
    ("dw:J", ("jax dweight vs ref",)),
    ("dw:TJ", ("torch vs jax dweight",)),
]
TABLE_CHECKS = {name for _, names in COLUMNS for name in names}

LEGEND = f"""\
Bounds (one unit per column, by dtype):
  y   bf16/fp16, casting fp32: ulps of the output dtype at the float64 reference, <= 1
      bf16/fp16, casting llama: steps outside the contract's llama result (xhat rounded
        in its dtype, then times w), allowing only near-midpoint xhat to round either way,
        == 0 (Hugging Face's distance is listed at the end, for information)
      fp32 (values marked "r"): relative error, <= {FP32_REL:g} (1 ulp accepted at zero
        and subnormals); their ulps are listed at the end, for information
      torch vs jax: <= 1 ulp (fp32: {FP32_REL:g} relative)
  h   the fused sum round(h_dtype, x.f32 + r.f32): bit-exact (0 ulps), both halves and
      against each other
  dx, dr: per row, max |error| in ulps of the gradient's dtype at the row's largest term
      |rstd*g| + |rstd*xhat*mean(g*xhat)| (+|dh|), <= 1 (fp32: relative to it, <= {FP32_REL:g})
  dw: max |error| in ulps of the weight dtype at max |dweight|, <= 1 (fp32: {FP32_REL:g} rel.)
  T = accel_torch, J = accel_jax, TJ = torch vs jax; "-" = not applicable to the case.
Other checks (all must hold): shapes/dtypes; forward with and without autograd
bit-identical; inputs unchanged; zero rows exactly zero; a NaN row all NaN and the other
rows bit-identical to a run without the NaN; fp32-overflowing rows zero as in PyTorch;
DLPack zero-copy on CUDA."""


def environment(device: torch.device, real: bool) -> dict:
    """Versions and device of this run (goes into the report's header and JSON)."""
    import jax
    import triton

    import accel_jax
    import accel_torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    other = "compiled" if device.type == "cuda" else "compiled/fallback"
    t_mode = "interpreted" if accel_torch.interpret_enabled() else other
    j_mode = "interpreted" if accel_jax.get_interpret() else other
    mode = f"accel_torch {t_mode}, accel_jax {j_mode}"
    if device.type == "cuda" and t_mode == j_mode == "compiled":
        mode = "compiled kernels"
    elif t_mode == j_mode == "compiled/fallback":
        mode = "reference math (no kernels: interpretation off on CPU)"
    return {
        "device_type": device.type,
        "device": name,
        "mode": mode,
        "jax_backend": jax.default_backend(),
        "accel_jax_kernels": accel_jax.backends.backend(),  # ACCEL_JAX_BACKEND's choice
        "sizes": "real" if real else "small",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "jax": jax.__version__,
    }


def _fmt(c: Check | None) -> str:
    if c is None:
        return "-"
    v = c.value
    if math.isinf(v) or math.isnan(v):
        s = str(v)
    elif c.unit.startswith("rel"):
        s = f"{v:.1e}r"
    elif c.unit == "count":
        s = str(int(v))
    else:
        s = f"{v:.2f}"
    return s if c.ok else s + "!"


def _cell(res: CaseResult, names: tuple[str, ...]) -> str:
    found = [c for c in res.checks if c.name in names]
    found += [c for c, _ in res.waived if c.name in names]
    if not found:
        return "-"
    worst = max(found, key=lambda c: (not c.ok, c.value / c.bound if c.bound else c.value))
    waived = any(c.name in names for c, _ in res.waived)
    return _fmt(worst) + ("w" if waived else "")


def render_text(results: list[CaseResult], env: dict) -> str:
    """The report as a fixed-width table plus breaches, waivers and informational numbers."""
    lines = [
        "accel RMSNorm numerics parity report (python -m tests.numerics)",
        "device: {device} ({device_type}, {mode}; JAX {jax_backend}, accel_jax kernels "
        "{accel_jax_kernels}); sizes: {sizes}".format(**env),
        "python {python}, torch {torch}, triton {triton}, jax {jax}".format(**env),
        "",
        LEGEND,
        "",
    ]
    name_w = max([len(r.case.name) for r in results] + [4])
    head = f"{'case':{name_w}}  " + " ".join(f"{h:>8}" for h, _ in COLUMNS) + "  other  status"
    lines += [head, "-" * len(head)]
    for r in results:
        cells = [f"{_cell(r, names):>8}" for _, names in COLUMNS]
        other = [c for c in r.checks if c.name not in TABLE_CHECKS]
        bad_other = sum(not c.ok for c in other)
        status = "ok" if r.ok else "BREACH"
        if r.waived:
            status += f" ({len(r.waived)} waived)"
        lines.append(
            f"{r.case.name:{name_w}}  " + " ".join(cells) + f"  {bad_other:>2}/{len(other):<2}"
            f"  {status}"
        )
    n_bad = sum(not r.ok for r in results)
    lines += [
        "",
        f"{len(results)} cases, {n_bad} with breaches, "
        f"{sum(len(r.waived) for r in results)} waived checks; {env.get('seconds', '?')} s",
    ]
    breaches = [(r, c) for r in results for c in r.breaches()]
    if breaches:
        lines += ["", "BREACHES:"]
        for r, c in breaches:
            note = f" [{c.note}]" if c.note else ""
            lines.append(
                f"  {r.case.name} ({r.case.describe()}): {c.name} = {c.value:.4g} {c.unit}"
                f" > {c.bound:g}{note}"
            )
    waived = [(r, c, why) for r in results for c, why in r.waived]
    if waived:
        lines += ["", "WAIVED (failing here, enforced elsewhere; reason given once):"]
        seen = set()
        for r, c, why in waived:
            tail = "" if why in seen else f"\n      because: {why}"
            seen.add(why)
            lines.append(f"  {r.case.name}: {c.name} = {c.value:.4g} {c.unit}{tail}")
    fp32 = [r for r in results if r.case.x_dtype == torch.float32 and r.info]
    if fp32:
        lines += ["", "fp32 outputs in fp32 ulps against float64 (info):"]
        for r in fp32:
            ulps = {k: v for k, v in r.info.items() if "ulp" in k}
            lines.append(
                f"  {r.case.name}: " + ", ".join(f"{k} = {v:.3g}" for k, v in ulps.items())
            )
    infos = [(r, k, v) for r in results for k, v in r.info.items() if "HF" in k]
    if infos:
        lines += [
            "",
            "Hugging Face LlamaRMSNorm distance (info; the contract's 1 ulp is not attainable "
            "where xhat rounds on the other side of a midpoint - see the llama bound):",
        ]
        for r in results:
            hf = {k: v for k, v in r.info.items() if "HF" in k}
            if hf:
                lines.append(
                    f"  {r.case.name}: " + ", ".join(f"{k} = {v:g}" for k, v in hf.items())
                )
    return "\n".join(lines) + "\n"


def render_json(results: list[CaseResult], env: dict) -> str:
    """The report as JSON: environment, then per case its fields, checks, info, waivers."""

    def check(c: Check, why: str | None = None) -> dict:
        d = {"name": c.name, "value": _num(c.value), "bound": c.bound, "unit": c.unit, "ok": c.ok}
        if c.note:
            d["note"] = c.note
        if why:
            d["waived_because"] = why
        return d

    out = {
        "environment": env,
        "ok": all(r.ok for r in results),
        "cases": [
            {
                "name": r.case.name,
                "describe": r.case.describe(),
                "case": {k: v for k, v in vars(r.case).items()},
                "ok": r.ok,
                "seconds": round(r.seconds, 3),
                "checks": [check(c) for c in r.checks],
                "waived": [check(c, why) for c, why in r.waived],
                "info": {k: _num(v) for k, v in r.info.items()},
            }
            for r in results
        ],
    }
    return json.dumps(out, indent=1)


def _num(v: float):
    return v if math.isfinite(v) else str(v)
