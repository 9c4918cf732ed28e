"""`colm import gguf FILE OUT`: a llama-architecture GGUF file as a one-chain CoLM checkpoint.

Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants and
whatever else gguf.quants can dequantize); q and k rows are put back in Hugging Face order (llama.cpp's
converter permutes them for its rope); the tokenizer is rebuilt from the metadata (gguf_tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from colm_runtime.importers.gguf_tokenizer import build_tokenizer, special_tokens
from colm_runtime.importers.llama import ImportRefused, LlamaArch, colm_state, hf_names, pick_dtype, write_model_dir

# GGUF tensor names of a llama block -> Hugging Face names (model.layers.{l}.<value>)
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows ([n_head * hd, in] -> same shape):
    it interleaves each head's two rotary halves; Hugging Face's rotate-half rope wants them apart."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's permutation (for writing GGUF files in tests and tools)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader, where: str) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:  # a field type this gguf version cannot decode
            raise ImportRefused(f"{where}: metadata field {key!r} unreadable ({e})") from None
    return meta


def read_arch(meta: dict, names: set[str], where: str) -> LlamaArch:
    """The LlamaArch of llama.* metadata; refuses what a CoLM cannot represent, naming the field."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ImportRefused(f"{where}: general.architecture {arch!r} is not supported (only 'llama')")

    def need(key: str):
        if f"llama.{key}" not in meta:
            raise ImportRefused(f"{where}: missing metadata llama.{key}")
        return meta[f"llama.{key}"]

    if meta.get("llama.expert_count"):
        raise ImportRefused(f"{where}: llama.expert_count = {meta['llama.expert_count']}: mixture of experts "
                            "is not supported")
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind != "none" or "rope_freqs.weight" in names:
        raise ImportRefused(f"{where}: rope scaling ({'rope_freqs.weight' if kind == 'none' else kind}) in GGUF "
                            "is not supported; import the Hugging Face directory instead")
    heads, hidden = need("attention.head_count"), need("embedding_length")
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    rope_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ImportRefused(f"{where}: llama.rope.dimension_count {rope_dim} != head dim {head_dim}: "
                            "partial rotary embeddings are not supported")
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    return LlamaArch(vocab_size=vocab, hidden_size=hidden, n_layers=need("block_count"), n_heads=heads,
                     n_kv_heads=meta.get("llama.attention.head_count_kv", heads), head_dim=head_dim,
                     intermediate_size=need("feed_forward_length"),
                     rope_theta=meta.get("llama.rope.freq_base", 10000.0),
                     norm_eps=need("attention.layer_norm_rms_epsilon"),
                     max_position_embeddings=need("context_length"),
                     tie_word_embeddings="output.weight" not in names)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF llama tensor, or None if it is not one of a dense Llama's."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.weight"
    return None


def dequantize(t, where: str) -> torch.Tensor:
    """A GGUF tensor as fp32 torch, [out, in] (GGUF lists dimensions innermost first)."""
    from gguf import quants

    try:
        # a plain view of the memory map: numpy's memmap subclass costs ~1 us per row slice otherwise
        arr = quants.dequantize(t.data.view(np.ndarray), t.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ImportRefused(f"{where}: tensor '{t.name}' of type {t.tensor_type.name} cannot be dequantized "
                            f"by the gguf package ({e})") from None
    shape = tuple(int(n) for n in reversed(list(t.shape)))
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy


def import_gguf(src: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Import a llama GGUF file; returns OUT."""
    from gguf import GGUFReader

    path, where = Path(src), str(src)
    if not path.is_file():
        raise ImportRefused(f"{where}: no such file")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on a corrupt file
        raise ImportRefused(f"{where}: not a readable GGUF file ({e})") from None
    meta = read_metadata(reader, where)
    tensors = {t.name: t for t in reader.tensors}
    unknown = sorted(n for n in tensors if hf_name(n) is None)
    if unknown:
        raise ImportRefused(f"{where}: unsupported tensor(s) {unknown[:5]} (a dense Llama has none)")
    arch = read_arch(meta, set(tensors), where)
    cfg = arch.colm_config(where)
    by_hf = {hf_name(n): t for n, t in tensors.items()}
    missing = sorted(set(hf_names(cfg.n_layers, cfg.tie_word_embeddings)) - set(by_hf))
    if missing:
        raise ImportRefused(f"{where}: missing tensor for '{missing[0]}'")

    def get(name: str) -> torch.Tensor:
        w = dequantize(by_hf[name], where)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, arch.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, arch.n_kv_heads)
        return w

    state = colm_state(cfg, get, pick_dtype(dtype, cfg), where)
    tok = build_tokenizer(meta, where)
    tcfg, gen = special_tokens(meta, meta["tokenizer.ggml.tokens"])
    template = meta.get("tokenizer.chat_template")
    return write_model_dir(out, cfg, state, tok.to_str(), tcfg, gen, template if isinstance(template, str) else None)
