"""The Llama training step (forward, loss, backward; no optimizer step) for each variant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.model import llama_torch as lt
from bench.model.configs import RunConfig
from bench.model.steps import measure


def train_step(model, ids) -> Callable[[], object]:
    """One step on ``ids`` (1, seq) int64: gradients set to None, causal-LM loss on the
    ids themselves (HF shifts the labels), backward. Returns the loss."""

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    return step


def grad_norm(model) -> float:
    """The L2 norm of all parameter gradients, in fp32 (a check that variants agree)."""
    import torch

    norms = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def runnable(records: list[dict], rec: dict, device: str) -> bool:
    """Append ``rec`` to ``records``; False (rec marked missing, with why) if its variant
    cannot run here."""
    records.append(rec)
    why = missing_reason(rec["variant"], device)
    if why is not None:
        rec.update(status="missing", reason=why)
    return why is None


def missing_reason(variant: str, device: str) -> str | None:
    """Why a variant cannot run here (None if it can)."""
    if variant != "liger":
        return None
    if device != "cuda":
        return "Liger-Kernel's RMSNorm is a Triton kernel: needs CUDA"
    return lt.liger_missing()


def run(cfg: RunConfig, device: str, trace_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """Records (one per layer count and variant) of the training step."""
    import torch

    from bench.model.report import error_text

    dtype = lt.DTYPES[cfg.dtype]
    records = []
    for layers in cfg.layers:
        model = lt.build_llama(cfg.shape, layers, device, dtype, cfg.seed)
        switch = lt.NormSwitch(model)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        ids = torch.randint(0, cfg.shape.vocab, (1, cfg.seq), generator=gen).to(device)
        for variant in lt.VARIANTS:
            rec = dict(
                part="train",
                variant=variant,
                label=lt.LABELS[variant],
                layers=layers,
                batch=1,
                seq=cfg.seq,
                norms=len(switch.original),
            )
            if not runnable(records, rec, device):
                continue
            log(f"train: {layers} layers, {variant}")
            try:
                norms = switch.use(variant)
                step = train_step(model, ids)
                rec["loss"] = float(step().detach())
                rec["grad_norm"] = grad_norm(model)
                measure(
                    rec,
                    step,
                    norms,
                    trace_dir / f"train_{layers}l_{variant}.json",
                    cfg.steps,
                    cfg.warmup,
                )
            except Exception as e:  # recorded; the run goes on with the next variant
                rec.update(status="error", reason=error_text(e))
            finally:
                model.zero_grad(set_to_none=True)
        switch.use("hf")
        del model, switch
        if device == "cuda":
            torch.cuda.empty_cache()
    return records
