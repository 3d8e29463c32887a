"""The Llama decode step: one new token per sequence against a KV cache of ``past`` tokens.

For each variant the cache is filled by a prefill of the same ``past`` random tokens (with
HF's norms). With ``cache="static"`` (default) it is HF's ``StaticCache`` (preallocated,
written in place, as compiled/serving decoders do) with room for ``past + STATIC_ROOM``
tokens: each step appends one, so steps see ``past`` to ``past + steps`` cached tokens
(the same for every variant), and a step past the room raises instead of writing out of
bounds. ``"dynamic"`` is HF's default ``DynamicCache``, which concatenates (copies) each
layer's keys and values every step; there each step is followed by ``cache.crop(-1)``, so
every step sees ``past`` tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from bench.model import llama_torch as lt
from bench.model.configs import RunConfig
from bench.model.steps import measure
from bench.model.train_torch import runnable

PROFILED_STEPS = 3
STATIC_ROOM = 512  # tokens a static cache holds past the prefill: more than a run's steps


def make_cache(model, kind: str, batch: int, max_len: int):
    """An empty HF cache of ``kind`` ("static" or "dynamic") for ``batch`` sequences."""
    import transformers

    if kind == "dynamic":
        return transformers.DynamicCache()
    if kind != "static":
        raise ValueError(f"cache must be 'static' or 'dynamic', got {kind!r}")
    accepted = inspect.signature(transformers.StaticCache.__init__).parameters
    param = next(model.parameters())
    extra = {
        "max_batch_size": batch,
        "batch_size": batch,
        "device": param.device,
        "dtype": param.dtype,
    }  # the arguments older transformers need
    kwargs = {k: v for k, v in extra.items() if k in accepted}
    return transformers.StaticCache(config=model.config, max_cache_len=max_len, **kwargs)


def prefill(model, cache, prompt) -> None:
    """Fill ``cache`` with ``prompt`` (batch, past) int64."""
    import torch

    kwargs = {lt.cache_kwarg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # not the (batch, past, vocab) logits
    with torch.inference_mode():
        model(input_ids=prompt, **kwargs)


def decode_step(model, cache, token, room: int | None = None) -> Callable[[], object]:
    """One decode step of ``token`` (batch, 1) int64 (see the module docstring); ``room``:
    the steps a static cache has room for. Returns the logits (batch, 1, vocab)."""
    import torch
    import transformers

    kwargs = {lt.cache_kwarg(model): cache, "use_cache": True}
    static = isinstance(cache, transformers.StaticCache)
    taken = [0]

    def step():
        if static:
            if room is None or taken[0] >= room:
                raise RuntimeError(f"the static cache has room for {room} decode steps, all taken")
            taken[0] += 1
        with torch.inference_mode():
            logits = model(input_ids=token, **kwargs).logits
            if not static:
                cache.crop(-1)
        return logits

    return step


def run(cfg: RunConfig, device: str, trace_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """Records (one per batch size and variant) of the decode step."""
    import torch

    from bench.model.report import error_text

    dtype = lt.DTYPES[cfg.dtype]
    model = lt.build_llama(cfg.shape, cfg.decode_layers, device, dtype, cfg.seed).eval()
    switch = lt.NormSwitch(model)
    records = []
    for batch in cfg.decode_batches:
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        prompt = torch.randint(0, cfg.shape.vocab, (batch, cfg.past), generator=gen).to(device)
        token = torch.randint(0, cfg.shape.vocab, (batch, 1), generator=gen).to(device)
        for variant in lt.VARIANTS:
            rec = dict(
                part="decode",
                variant=variant,
                label=lt.LABELS[variant],
                layers=cfg.decode_layers,
                batch=batch,
                past=cfg.past,
                cache=cfg.cache,
                norms=len(switch.original),
            )
            if not runnable(records, rec, device):
                continue
            log(f"decode: batch {batch}, {variant}")
            try:
                switch.use("hf")
                cache = make_cache(model, cfg.cache, batch, cfg.past + STATIC_ROOM)
                prefill(model, cache, prompt)
                norms = switch.use(variant)
                step = decode_step(model, cache, token, STATIC_ROOM)
                logits = step()
                expected = cfg.past + (1 if cfg.cache == "static" else 0)
                if int(cache.get_seq_length()) != expected:
                    raise RuntimeError(
                        f"the cache holds {int(cache.get_seq_length())} tokens after a step, "
                        f"not {expected}"
                    )
                rec["logits_norm"] = float(logits.float().norm())
                # Decode steps are short: three times the training step's counts.
                trace = trace_dir / f"decode_b{batch}_{variant}.json"
                measure(rec, step, norms, trace, 3 * cfg.steps, 3 * cfg.warmup, PROFILED_STEPS)
            except Exception as e:  # recorded; the run goes on with the next variant
                rec.update(status="error", reason=error_text(e))
            cache = None
        if device == "cuda":
            torch.cuda.empty_cache()
    switch.use("hf")
    return records
