"""A small Flax nnx transformer trained with ``accel_jax.nnx.RMSNorm`` and ``flax.nnx.RMSNorm``.

    python examples/flax_nnx.py [--steps 12] [--json curves.json]

Both models are built with the same seed (random weights, nothing downloaded), the second
takes the first's parameters, and both see the same batches: their loss curves differ only
by the RMSNorm implementation. On a CUDA GPU ``accel_jax`` runs its Pallas kernels; on a CPU
it runs the same math in plain jnp (leave ``ACCEL_INTERPRET`` unset: interpreted kernels are
for testing and far slower).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from curves import parse_args, report
from flax import nnx

import accel_jax.nnx

VOCAB, WIDTH, HEADS, LAYERS = 128, 64, 4, 2


class Block(nnx.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, norm, rngs: nnx.Rngs):
        self.attn_norm = norm(WIDTH, epsilon=1e-6, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            HEADS, WIDTH, decode=False, deterministic=True, rngs=rngs
        )
        self.mlp_norm = norm(WIDTH, epsilon=1e-6, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.attn_norm(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nnx.Module):
    """Token embedding, ``LAYERS`` blocks, a final norm and a tied output projection."""

    def __init__(self, norm, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.blocks = nnx.List([Block(norm, rngs) for _ in range(LAYERS)])
        self.norm = norm(WIDTH, epsilon=1e-6, rngs=rngs)

    def __call__(self, ids):  # ids: (batch, seq) int32 -> logits (batch, seq, VOCAB)
        x = self.embed(ids)
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))


def batches(steps: int, batch: int, seq: int, seed: int = 1) -> list[jax.Array]:
    """(batch, seq) int32 token ids counting up by a fixed stride from a random start."""
    keys = jax.random.split(jax.random.key(seed), steps)
    starts = [jax.random.randint(k, (batch, 1), 0, VOCAB) for k in keys]
    return [(s + 3 * jnp.arange(seq)) % VOCAB for s in starts]


def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


@nnx.jit
def train_step(model, optimizer, ids):
    loss, grads = nnx.value_and_grad(loss_fn)(model, ids)
    optimizer.update(model, grads)
    return loss


def train(models: list, data: list[jax.Array]) -> list:
    """AdamW steps of next-token loss, the models in turn on each batch (so that neither
    pays the warm-up alone); returns, per model, (loss per step, seconds per step)."""
    optimizers = [nnx.Optimizer(m, optax.adamw(3e-3), wrt=nnx.Param) for m in models]
    curves = [([], []) for _ in models]
    for ids in data:
        for model, optimizer, (losses, seconds) in zip(models, optimizers, curves, strict=True):
            t0 = time.perf_counter()
            loss = float(train_step(model, optimizer, ids))  # float() waits for the device
            seconds.append(time.perf_counter() - t0)
            losses.append(loss)
    return curves


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    flax_model = TinyLM(nnx.RMSNorm, nnx.Rngs(0))
    ours = TinyLM(accel_jax.nnx.RMSNorm, nnx.Rngs(0))
    nnx.update(ours, nnx.state(flax_model))  # the same initial weights
    data = batches(args.steps, args.batch, args.seq + 1)
    (flax_loss, flax_s), (our_loss, our_s) = train([flax_model, ours], data)

    device = jax.default_backend()
    path = "Pallas kernels" if device == "gpu" else "plain-jnp path (no GPU)"
    print(f"tiny nnx transformer on {device}, accel_jax: {path}")
    names = ("flax.nnx.RMSNorm", "accel_jax")
    return report(names, (flax_loss, our_loss), (flax_s, our_s), args.json, device=device)


if __name__ == "__main__":
    main()
