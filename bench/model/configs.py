"""Model shapes and run settings: the Llama-3-8B shape for GPUs and a tiny one for CPUs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's shape (what ``transformers.LlamaConfig`` takes)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = Shape(
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    vocab=128256,
    rope_theta=500000.0,
    eps=1e-5,
)
TINY = Shape(
    hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=256, rope_theta=500000.0, eps=1e-5
)


@dataclass
class RunConfig:
    """What ``python -m bench.model`` runs. Times are medians over ``steps`` timed steps
    after ``warmup`` untimed ones; ``parts`` is a subset of ("train", "decode", "nnx")."""

    shape: Shape
    layers: list[int]
    seq: int
    decode_layers: int
    decode_batches: list[int]
    past: int
    nnx_layers: int
    steps: int
    warmup: int
    dtype: str = "bf16"
    cache: str = "static"
    parts: list[str] = field(default_factory=lambda: ["train", "decode", "nnx"])
    seed: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shape"]["head_dim"] = self.shape.head_dim
        return out


def default_config(on_gpu: bool) -> RunConfig:
    """The defaults: the 8B shape at 4 and 8 layers on a GPU, the tiny shape on a CPU."""
    if on_gpu:
        return RunConfig(
            shape=LLAMA3_8B,
            layers=[4, 8],
            seq=4096,
            decode_layers=4,
            decode_batches=[1, 8, 64],
            past=1024,
            nnx_layers=4,
            steps=10,
            warmup=3,
        )
    return RunConfig(
        shape=TINY,
        layers=[1, 2],
        seq=32,
        decode_layers=2,
        decode_batches=[1, 4],
        past=16,
        nnx_layers=2,
        steps=5,
        warmup=1,
    )
