"""`colm export hf MODEL_DIR OUT`: a one-chain CoLM checkpoint as a Hugging Face LlamaForCausalLM
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat template
and special tokens, generation_config.json with the eos ids), for transformers or vLLM.

Multi-chain models are refused: each chain has its own RMSNorm statistics and its block-triangular
weights, which a dense Llama cannot express.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from colm_runtime.checkpoint import CheckpointError, load_config, load_state
from colm_runtime.importers.llama import ImportRefused, atomic_dir, hf_state, write_json
from colm_runtime.tokenizer import GENERATION_CONFIG, TOKENIZER_CONFIG, Tokenizer


def hf_config(cfg, dtype: str, tok: Tokenizer) -> dict:
    """config.json of the LlamaForCausalLM equal to a one-chain CoLM config."""
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.dim, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads[0], "head_dim": cfg.head_dim,
         "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
         "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
         "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
         "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
         "torch_dtype": dtype, "bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids)}
    return c


def export_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face directory atomically at OUT; returns OUT."""
    d = Path(model_dir)
    try:
        cfg = load_config(d)
        if cfg.n_chains != 1:
            raise ImportRefused(f"{d}: {cfg.n_chains} chains: only a one-chain model is a dense Llama (per-chain "
                                f"RMSNorm and block-triangular weights are not); `colm extract --chains 1` first")
        state = load_state(d, cfg)
        tok = Tokenizer.from_model_dir(d)
    except (CheckpointError, ValueError) as e:
        if isinstance(e, ImportRefused):
            raise
        raise ImportRefused(str(e)) from None
    weights = hf_state(cfg, state)
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    tcfg = json.loads((d / TOKENIZER_CONFIG).read_text()) if (d / TOKENIZER_CONFIG).is_file() else {}
    tcfg.setdefault("eos_token", tok.eos_token)
    if (d / "chat_template.jinja").is_file():
        tcfg["chat_template"] = (d / "chat_template.jinja").read_text()
    tcfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", hf_config(cfg, dtype, tok))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        (tmp / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
        write_json(tmp / TOKENIZER_CONFIG, tcfg)
        write_json(tmp / GENERATION_CONFIG, {"bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids)})
    return Path(out)
