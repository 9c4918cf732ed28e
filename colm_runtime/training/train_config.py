"""TrainConfig: every setting of a training run, frozen; stored in the checkpoint for --resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from colm_runtime.config import ModelConfig

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Model shape (ignored with `init`, which brings its own config): chains (heads per chain), kv_heads
    (per chain; CoLM-Air: one shared entry), n_layers, head_dim, ffn_mult (intermediate = ffn_mult * dim,
    rounded to whole per-head widths). Budget: `steps`, or `max_tokens` (converted to steps).
    Batches: batch_size sequences per process and micro-step, grad_accum micro-steps per optimiser step.
    parallel: how several processes (torchrun) share the work: "ddp" (replicas) or "fsdp" (FSDP2 shards).
    activation_checkpointing: blocks keep only their input for backward and recompute the rest.
    """

    data: tuple[str, ...]
    out: str
    val_data: tuple[str, ...] = ()
    val_fraction: float = 0.05
    tokenizer: str | None = None
    vocab_size: int = 4096
    chains: tuple[int, ...] = (2, 2, 2, 2)
    kv_heads: tuple[int, ...] = (1, 1, 1, 1)
    kv_sharing: bool = False
    n_layers: int = 4
    head_dim: int = 32
    ffn_mult: float = 2.75
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int | None = None
    max_tokens: int | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    loss_scales: tuple[int, ...] = ()
    loss_weights: tuple[float, ...] | None = None
    seed: int = 0
    eval_every: int = 200
    eval_tokens: int = 65536
    save_every: int = 200
    init: str | None = None
    freeze_chains: int = 0
    device: str = "auto"
    parallel: str = "ddp"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "val_data", "chains", "kv_heads", "loss_scales"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig of a run from scratch (ConfigError names a bad field)."""
        n_heads = sum(self.chains)
        per_head = max(1, round(self.ffn_mult * self.head_dim))  # FFN width per query head
        return ModelConfig(vocab_size=vocab_size, n_layers=self.n_layers, head_dim=self.head_dim,
                           chains=self.chains, kv_heads=self.kv_heads, intermediate_size=per_head * n_heads,
                           max_position_embeddings=self.max_position_embeddings,
                           tie_word_embeddings=self.tie_word_embeddings, kv_sharing=self.kv_sharing)

    def tokens_per_step(self, world: int) -> int:
        return self.batch_size * self.grad_accum * world * self.seq_len

    def total_steps(self, world: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.max_tokens is not None
        return -(-self.max_tokens // self.tokens_per_step(world))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
