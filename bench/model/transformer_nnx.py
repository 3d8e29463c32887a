"""A Flax nnx transformer of the Llama shape, trained one step with either RMSNorm.

Pre-norm blocks: ``x + o(attention(rope(q), rope(k), v))`` on ``attn_norm(x)`` (GQA through
``jax.nn.dot_product_attention``, causal, implementation chosen by JAX), then
``h + down(silu(gate(y)) * up(y))`` on ``mlp_norm(h)``; token embedding, final norm and an
untied output projection, as Llama 3. The two models (``flax.nnx.RMSNorm``,
``accel_jax.nnx.RMSNorm``) share one set of parameters: the same state, two graphdefs.
The step is ``jax.jit(jax.value_and_grad(loss))`` (no optimizer update).

Timing on a GPU: CUPTI kernel records (``bench.jax_timing``): a step's time is the sum of
its kernels' times, median over steps; the norm's share for accel_jax is that of its Pallas
kernels (named ``rmsnorm_*``). flax's norm is fused by XLA into neighbouring kernels, so its
share cannot be read from kernel names. Peak memory: XLA's memory analysis of the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from bench.model.configs import RunConfig, Shape

VARIANTS = ("flax", "accel")
LABELS = {"flax": "flax.nnx.RMSNorm", "accel": "accel_jax.nnx.RMSNorm"}
ACCEL_KERNEL_NAME = "rmsnorm"  # in the names of accel_jax's Pallas kernels


def _norm_class(variant: str):
    from flax import nnx

    if variant == "flax":
        return nnx.RMSNorm
    if variant == "accel":
        import accel_jax.nnx

        return accel_jax.nnx.RMSNorm
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def rope(x, theta: float):
    """Rotary embedding (the half-split form HF Llama uses) of x (B, T, heads, head_dim)."""
    import jax.numpy as jnp

    t, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[None, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[None, :, None, :]
    half = d // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def build(shape: Shape, layers: int, variant: str, dtype, seed: int = 0, abstract=False):
    """The transformer with ``variant``'s norm (parameters in ``dtype``); with
    ``abstract=True`` only its structure (``nnx.eval_shape``: no parameters allocated)."""
    import jax
    from flax import nnx

    norm_cls = _norm_class(variant)

    class Block(nnx.Module):
        def __init__(self, rngs):
            d, hd = shape.hidden, shape.head_dim
            lin = dict(use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
            norm = dict(epsilon=shape.eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.attn_norm = norm_cls(d, **norm)
            self.q = nnx.Linear(d, shape.heads * hd, **lin)
            self.k = nnx.Linear(d, shape.kv_heads * hd, **lin)
            self.v = nnx.Linear(d, shape.kv_heads * hd, **lin)
            self.o = nnx.Linear(shape.heads * hd, d, **lin)
            self.mlp_norm = norm_cls(d, **norm)
            self.gate = nnx.Linear(d, shape.intermediate, **lin)
            self.up = nnx.Linear(d, shape.intermediate, **lin)
            self.down = nnx.Linear(shape.intermediate, d, **lin)

        def __call__(self, x):
            b, t, _ = x.shape
            hd = shape.head_dim
            y = self.attn_norm(x)
            q = rope(self.q(y).reshape(b, t, shape.heads, hd), shape.rope_theta)
            k = rope(self.k(y).reshape(b, t, shape.kv_heads, hd), shape.rope_theta)
            v = self.v(y).reshape(b, t, shape.kv_heads, hd)
            a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.reshape(b, t, shape.heads * hd))
            y = self.mlp_norm(x)
            return x + self.down(nnx.silu(self.gate(y)) * self.up(y))

    class Transformer(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(
                shape.vocab, shape.hidden, dtype=dtype, param_dtype=dtype, rngs=rngs
            )
            self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
            self.norm = norm_cls(
                shape.hidden, epsilon=shape.eps, dtype=dtype, param_dtype=dtype, rngs=rngs
            )
            self.head = nnx.Linear(
                shape.hidden, shape.vocab, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs
            )

        def __call__(self, ids):  # (B, T) int32 -> logits (B, T, vocab)
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    make = lambda: Transformer(nnx.Rngs(seed))  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


def loss_and_grad(graphdef) -> Callable:
    """``f(params, ids) -> (loss, grads)``: mean next-token cross entropy (fp32 log-softmax)
    of ids (B, T+1) int32 through the model ``graphdef`` with ``params``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss(params, ids):
        model = nnx.merge(graphdef, params)
        logits = model(ids[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return jax.value_and_grad(loss)


def models(shape: Shape, layers: int, dtype, seed: int = 0) -> tuple[dict, object]:
    """({variant: graphdef}, params): both variants' graphdefs over one parameter state
    (built once, with flax's norms)."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(build(shape, layers, "flax", dtype, seed))
    defs = {"flax": graphdef}
    accel_def, accel_params = nnx.split(build(shape, layers, "accel", dtype, seed, True))
    if jax.tree.structure(accel_params) != jax.tree.structure(params):
        raise RuntimeError("accel_jax.nnx.RMSNorm's model state differs from flax's")
    defs["accel"] = accel_def
    return defs, params


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[name]


def run(cfg: RunConfig, log: Callable[[str], None], outputs: dict | None = None) -> list[dict]:
    """Records (one per variant) of the nnx training step; ``outputs``, if given, receives
    each variant's first ``(loss, grads)`` (for checks)."""
    import jax

    from bench import jax_timing
    from bench.metrics import median
    from bench.model.report import error_text

    on_gpu = jax.default_backend() == "gpu"
    defs, params = models(cfg.shape, cfg.nnx_layers, _dtype(cfg.dtype), cfg.seed)
    key = jax.random.key(cfg.seed + 3)
    ids = jax.random.randint(key, (1, cfg.seq + 1), 0, cfg.shape.vocab, dtype=jax.numpy.int32)
    measure, why_not = jax_timing.load_profiler() if on_gpu else (None, "no GPU")
    records = []
    for variant in VARIANTS:
        rec = dict(
            part="nnx",
            variant=variant,
            label=LABELS[variant],
            layers=cfg.nnx_layers,
            batch=1,
            seq=cfg.seq,
            norms=2 * cfg.nnx_layers + 1,
        )
        records.append(rec)
        log(f"nnx: {cfg.nnx_layers} layers, {variant}")
        try:
            f = loss_and_grad(defs[variant])
            jitted = jax.jit(f)
            loss, grads = jitted(params, ids)
            rec["loss"] = float(loss)
            rec["grad_norm"] = float(
                jax.numpy.sqrt(
                    sum((g.astype(jax.numpy.float32) ** 2).sum() for g in jax.tree.leaves(grads))
                )
            )
            if outputs is not None:
                outputs[variant] = (loss, grads)
            del grads
            # XLA's memory analysis (a second compile): only where it means device memory.
            rec["peak_bytes"] = jax_timing.peak_bytes(f, (params, ids)) if on_gpu else None
            cupti_error = None
            if measure is not None:
                try:
                    per_call = jax_timing.call_records(measure, jitted, (params, ids), cfg.steps)
                    rec["step_ms"] = median(jax_timing.call_us(per_call)) / 1e3
                    rec["timing"] = jax_timing.WARM_METHOD.replace("(us)", "(ms)")
                    rec["profile"] = _kernel_share(per_call, variant)
                except Exception as e:  # then wall-clock, saying why
                    cupti_error = error_text(e)
            if "step_ms" not in rec:
                from bench import timing

                call = functools.partial(_blocking_call, jitted, params, ids)
                rec["step_ms"] = timing.cpu_wall_us(call, min_calls=cfg.steps, budget_s=0.0) / 1e3
                why = cupti_error or why_not
                rec["timing"] = timing.CPU_METHOD if not on_gpu else f"wall clock ({why})"
            rec["status"] = "ok"
        except Exception as e:  # recorded; the run goes on with the next variant
            rec.update(status="error", reason=error_text(e))
    return records


def _blocking_call(jitted, *args):
    import jax

    return jax.block_until_ready(jitted(*args))


def _kernel_share(per_call: list, variant: str) -> dict:
    """Norm share of one call's kernels (the median call by total time)."""
    from bench import jax_timing

    totals = jax_timing.call_us(per_call)
    records = per_call[sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]]
    total = sum(ms for _, ms in records) * 1e3
    out = {"total_us": total, "kernel_count": len(records)}
    if variant != "accel":
        out.update(
            norm_us=None,
            share=None,
            note="XLA fuses flax's norm into neighbouring kernels: not attributable",
        )
        return out
    kernels: dict[str, list] = {}
    for name, ms in records:
        if ACCEL_KERNEL_NAME in name:
            entry = kernels.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += ms * 1e3
    norm = sum(us for _, us in kernels.values())
    out.update(
        norm_us=norm,
        share=norm / total if total else None,
        kernels={k: [c, round(us, 3)] for k, (c, us) in kernels.items()},
    )
    return out
