"""The frozen model configuration of a Chain-of-Model (CoLM) Transformer.

Chains are counted in attention heads (paper notation C = {c_1, ..., c_n}); every derived width is a
property, never a stored field, so a config can be written to config.json and read back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any


LLAMA3_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


class ConfigError(ValueError):
    """A model configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a CoLM model.

    kv_heads: plain CoLM: the number of KV heads of each chain (GQA inside the chain, c_i % kv_i == 0).
      CoLM-Air (kv_sharing=True): a single entry, the KV heads computed from chain 1 and shared by
      every query head of every chain.
    intermediate_size: the FFN width of the whole model; chain i gets intermediate_size * c_i / sum(C).
    """

    vocab_size: int
    n_layers: int
    head_dim: int
    chains: tuple[int, ...]
    kv_heads: tuple[int, ...]
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    kv_sharing: bool = False
    # Llama-3 frequency scaling of the rotary embedding (imported models), stored as sorted (key, value)
    # pairs so the config stays hashable; config.json holds it as an object. None: plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and frozen.
        object.__setattr__(self, "chains", tuple(int(c) for c in self.chains))
        object.__setattr__(self, "kv_heads", tuple(int(c) for c in self.kv_heads))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        self._validate()

    def _validate(self) -> None:
        def need(cond: bool, field: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"invalid model config: {field}: {why}")

        for name in ("vocab_size", "n_layers", "head_dim", "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        need(self.head_dim % 2 == 0, "head_dim", "must be even (rotary embeddings)")
        need(len(self.chains) >= 1 and all(c > 0 for c in self.chains), "chains", "must be positive head counts")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(0 < self.norm_eps < 1, "norm_eps", "must be in (0, 1)")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            need(rs.get("rope_type") == "llama3" and set(rs) == set(LLAMA3_ROPE_KEYS), "rope_scaling",
                 f"only {{'rope_type': 'llama3'}} with {sorted(LLAMA3_ROPE_KEYS)} is supported, got {rs}")
            need(all(isinstance(rs[k], (int, float)) and rs[k] > 0 for k in LLAMA3_ROPE_KEYS if k != "rope_type"),
                 "rope_scaling", "factors and original_max_position_embeddings must be positive numbers")
            need(rs["high_freq_factor"] > rs["low_freq_factor"], "rope_scaling",
                 "high_freq_factor must exceed low_freq_factor")
        if self.kv_sharing:
            need(len(self.kv_heads) == 1, "kv_heads", "CoLM-Air takes one entry: the shared KV heads")
            kv = self.kv_heads[0]
            need(kv > 0 and all(c % kv == 0 for c in self.chains), "kv_heads",
                 f"every chain's head count must be a multiple of the shared KV heads ({kv})")
        else:
            need(len(self.kv_heads) == len(self.chains), "kv_heads", "one entry per chain")
            need(all(kv > 0 and c % kv == 0 for c, kv in zip(self.chains, self.kv_heads)), "kv_heads",
                 "each chain's head count must be a multiple of its KV heads")
        need(all(self.intermediate_size * c % self.n_heads == 0 for c in self.chains),
             "intermediate_size", f"must split into whole widths in proportion to chains {list(self.chains)}")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def n_chains(self) -> int:
        return len(self.chains)

    @property
    def n_heads(self) -> int:
        return sum(self.chains)

    @property
    def dim(self) -> int:
        return self.n_heads * self.head_dim

    @cached_property
    def chain_widths(self) -> tuple[int, ...]:
        """Hidden width of each chain."""
        return tuple(c * self.head_dim for c in self.chains)

    @cached_property
    def ffn_widths(self) -> tuple[int, ...]:
        """FFN intermediate width of each chain."""
        return tuple(self.intermediate_size * c // self.n_heads for c in self.chains)

    @cached_property
    def chain_kv_heads(self) -> tuple[int, ...]:
        """KV heads each chain's qkv block produces (CoLM-Air: chain 1 produces the shared ones)."""
        if self.kv_sharing:
            return (self.kv_heads[0],) + (0,) * (self.n_chains - 1)
        return self.kv_heads

    @property
    def n_kv_pools(self) -> int:
        """Paged-KV pools: one per chain, or a single shared pool for CoLM-Air."""
        return 1 if self.kv_sharing else self.n_chains

    @cached_property
    def pool_kv_heads(self) -> tuple[int, ...]:
        """KV heads stored per token in each pool."""
        return (self.kv_heads[0],) if self.kv_sharing else self.kv_heads

    def pools_for(self, chains: int) -> int:
        """How many pools a request running at `chains` chains occupies (pools 0..result-1)."""
        return 1 if self.kv_sharing else chains

    def kv_pool_of_chain(self, chain: int) -> int:
        """The pool holding the K/V that the heads of chain `chain` (0-based) attend to."""
        return 0 if self.kv_sharing else chain

    def width(self, chains: int) -> int:
        """Hidden width of the sub-model made of the first `chains` chains."""
        return sum(self.chain_widths[:chains])

    def check_chains(self, chains: int) -> int:
        if not isinstance(chains, int) or not 1 <= chains <= self.n_chains:
            raise ConfigError(f"chain count must be an integer in 1..{self.n_chains}, got {chains!r}")
        return chains

    def truncated(self, chains: int) -> "ModelConfig":
        """The config of the standalone sub-model made of the first `chains` chains."""
        self.check_chains(chains)
        return dataclasses.replace(
            self,
            chains=self.chains[:chains],
            kv_heads=self.kv_heads if self.kv_sharing else self.kv_heads[:chains],
            intermediate_size=sum(self.ffn_widths[:chains]),
        )

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chains"] = list(self.chains)
        d["kv_heads"] = list(self.kv_heads)
        if self.rope_scaling is None:
            d.pop("rope_scaling")  # configs without it stay byte-identical to older ones
        else:
            d["rope_scaling"] = dict(self.rope_scaling)
        return {"model_type": "colm", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.pop("model_type", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"invalid model config: unknown field(s) {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"invalid model config: missing field(s) {missing}")
        try:
            return cls(**d)
        except TypeError as e:  # wrong value types reach here
            raise ConfigError(f"invalid model config: {e}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)
