"""A dense Llama is a CoLM with one chain: the shared part of every importer and of `colm export hf`.

Importers read their source into a LlamaArch plus tensors under Hugging Face's names
(`model.layers.{l}.self_attn.q_proj.weight`, [out, in]); `colm_state` maps those onto the CoLM tensor
names (qkv.chains.0 = cat(q, k, v), gate_up.chains.0 = cat(gate, up)) and `write_model_dir` writes
the checkpoint atomically: into a temporary directory beside OUT, renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from colm_runtime.checkpoint import expected_shapes, save_state
from colm_runtime.config import ConfigError, ModelConfig
from colm_runtime.tokenizer import GENERATION_CONFIG, TOKENIZER_CONFIG


class ImportRefused(ValueError):
    """A source we cannot represent or read; the message names the file, field or tensor."""


@dataclass(frozen=True)
class LlamaArch:
    """The shape of a dense Llama, whatever file it came from."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None

    def colm_config(self, where: str) -> ModelConfig:
        """The one-chain ModelConfig; ImportRefused (naming `where`) for what it cannot hold."""
        if self.n_heads * self.head_dim != self.hidden_size:
            raise ImportRefused(f"{where}: head_dim {self.head_dim} x {self.n_heads} heads != hidden size "
                                f"{self.hidden_size}: a head width other than hidden/heads is not supported")
        try:
            return ModelConfig(vocab_size=self.vocab_size, n_layers=self.n_layers, head_dim=self.head_dim,
                               chains=(self.n_heads,), kv_heads=(self.n_kv_heads,),
                               intermediate_size=self.intermediate_size, rope_theta=float(self.rope_theta),
                               norm_eps=float(self.norm_eps), max_position_embeddings=self.max_position_embeddings,
                               tie_word_embeddings=self.tie_word_embeddings, rope_scaling=self.rope_scaling)
        except ConfigError as e:
            raise ImportRefused(f"{where}: {e}") from None


def hf_names(n_layers: int, tied: bool) -> list[str]:
    """Every tensor of a dense Hugging Face LlamaForCausalLM."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    for l in range(n_layers):
        p = f"model.layers.{l}."
        names += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
    return names


def colm_state(cfg: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
               where: str) -> dict[str, torch.Tensor]:
    """CoLM tensors of a one-chain config from Hugging Face-named ones (`get(name)`, [out, in]).

    Each tensor is converted to `dtype` as soon as it is read, so peak memory stays near one copy."""
    def take(name: str) -> torch.Tensor:
        return get(name).to(dtype)

    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    for l in range(cfg.n_layers):
        p, q = f"model.layers.{l}.", f"layers.{l}."
        state[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        state[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        state[q + "attn.qkv.chains.0.weight"] = torch.cat(
            [take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        state[q + "attn.o.chains.0.weight"] = take(p + "self_attn.o_proj.weight")
        state[q + "ffn.gate_up.chains.0.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        state[q + "ffn.down.chains.0.weight"] = take(p + "mlp.down_proj.weight")
    for name, shape in expected_shapes(cfg).items():
        if tuple(state[name].shape) != shape:
            raise ImportRefused(f"{where}: tensor for '{name}' has shape {list(state[name].shape)}, the "
                                f"config implies {list(shape)}")
    return state


def hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of colm_state: a one-chain CoLM's tensors under Hugging Face Llama names."""
    hd, H, KV = cfg.head_dim, cfg.n_heads, cfg.kv_heads[0]
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for l in range(cfg.n_layers):
        p, q = f"model.layers.{l}.", f"layers.{l}."
        out[p + "input_layernorm.weight"] = state[q + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = state[q + "ffn_norm.weight"]
        wq, wk, wv = state[q + "attn.qkv.chains.0.weight"].split([H * hd, KV * hd, KV * hd])
        out.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                    p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": state[q + "attn.o.chains.0.weight"]})
        gate, up = state[q + "ffn.gate_up.chains.0.weight"].chunk(2)
        out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": state[q + "ffn.down.chains.0.weight"]})
    return {k: v.contiguous() for k, v in out.items()}


def pick_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """--dtype: float32, bfloat16, float16, or auto: bfloat16 from BIG_MODEL parameters on, else float32."""
    if name == "auto":
        n_params = sum(math.prod(s) for s in expected_shapes(cfg).values())
        return torch.bfloat16 if n_params >= BIG_MODEL else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ImportRefused(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


# "Big": 1B parameters and up. An fp32 copy of a 1B model is 4 GB, and loading it as bf16 halves memory
# and decode reads; below that (SmolLM2-135M: 540 MB in fp32) fp32 costs little and keeps exactness.
BIG_MODEL = 1_000_000_000


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds; removed on failure.
    Refuses an existing `out` (an import never overwrites)."""
    out = Path(out)
    if out.exists():
        raise ImportRefused(f"{out}: already exists (an import never overwrites; remove it first)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a container's non-root user must read the model
        os.rename(tmp, out)  # atomic on one filesystem; fails if another process created `out` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_dir(out: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer_json: str,
                    tokenizer_config: dict, generation_config: dict, chat_template: str | None) -> Path:
    """Write a CoLM checkpoint (docs/checkpoint-format.md) atomically at `out`."""
    with atomic_dir(out) as tmp:
        save_state(cfg, state, tmp)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        tcfg = dict(tokenizer_config)
        if chat_template is not None:
            tcfg["chat_template"] = chat_template
        write_json(tmp / TOKENIZER_CONFIG, tcfg)
        write_json(tmp / GENERATION_CONFIG, generation_config)
    return Path(out)
