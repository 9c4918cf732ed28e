"""Reference Llamas for the importer tests: random transformers LlamaForCausalLM directories (with a
ChatML tokenizer), GGUF files written from them the way llama.cpp's converter writes them, and the
comparisons (logits of a prefill and of paged decode steps, greedy generations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from colm_runtime.checkpoint import load_model
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams
from colm_runtime.importers.gguf_file import permute
from colm_runtime.testing import small_tokenizer
from tests.model._helpers import PagedRunner

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["The parser reads the", "Return a new list of 12 items", "import json\n"]


def chatml_tokenizer():
    """The project's small byte-level BPE plus ChatML's two special tokens (a `tokenizers` object)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(small_tokenizer(512).hf.to_str())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return tok


def make_hf_llama(out: Path, seed: int = 0, **overrides) -> Path:
    """save_pretrained (safetensors) of a random LlamaForCausalLM with a ChatML tokenizer. Weights are
    N(0, 0.08) and norm gains 1 + N(0, 0.1), so that every tensor's mapping shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = chatml_tokenizer()
    kw = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None,
              eos_token_id=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return out


def hf_load(d: Path, state: dict[str, torch.Tensor] | None = None):
    """transformers' fp32 model of a directory, optionally with replaced weights (dequantized ones)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
        if model.config.tie_word_embeddings:
            model.tie_weights()
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [S, V]


def assert_same_logits(colm_dir: Path, hf_model, ids: list[int], atol: float = 1e-4) -> None:
    """Our prefill over the paged cache, then token-by-token decode steps, == transformers' logits."""
    ours = load_model(colm_dir, dtype=torch.float32)
    ref = hf_logits(hf_model, ids)
    run = PagedRunner(ours, block_size=4)
    split = len(ids) // 2
    pre = run.step([(0, ids[:split], 0, 1)], all_logits=True)[0]
    torch.testing.assert_close(pre, ref[:split], rtol=0, atol=atol)
    for pos in range(split, len(ids)):
        step = run.step([(0, [ids[pos]], pos, 1)])[0]
        torch.testing.assert_close(step, ref[pos], rtol=0, atol=atol)


def colm_greedy(colm_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations through the engine, all prompts in one batch, EOS ignored."""
    engine = LLMEngine.from_model_dir(colm_dir, EngineConfig(kv_cache_memory=1 << 23, block_size=4,
                                                             dtype="float32"))
    reqs = [EngineRequest(f"g{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), 1)
            for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    return [out[r.request_id][0].token_ids for r in reqs]


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    res = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            res.append(out[0, len(p):].tolist())
    return res


def write_gguf(hf_dir: Path, path: Path, qtype: str = "F32", permute_qk: bool = True) -> dict[str, torch.Tensor]:
    """A llama GGUF of a Hugging Face directory, written as llama.cpp's convert_hf_to_gguf.py writes it
    (q and k rows permuted, names blk.N.*, tokenizer metadata). Matrices in `qtype` (F32 or Q8_0),
    norms in F32. Returns the Hugging Face-named weights as the file holds them once dequantized."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    state = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // H)
    _add_tokenizer(w, hf_dir)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    held = {}
    for name, t in state.items():
        if name.startswith("model.layers."):
            l, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{l}.{block[rest.removesuffix('.weight')]}.weight"
        else:
            gname = names[name]
        arr = t.float()
        if permute_qk and name.endswith("q_proj.weight"):
            arr = permute(arr, H)
        elif permute_qk and name.endswith("k_proj.weight"):
            arr = permute(arr, KV)
        arr = arr.numpy()
        if qtype == "Q8_0" and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            arr = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
        held[name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from colm_runtime.importers.gguf_file import unpermute

    for name in held:  # what the file holds, in Hugging Face row order
        if permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            held[name] = unpermute(held[name], H if "q_proj" in name else KV)
    return held


def _add_tokenizer(w, hf_dir: Path) -> None:
    """tokenizer.ggml.* metadata of a byte-level BPE tokenizer.json, as llama.cpp's converter writes it."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for a in tj["added_tokens"]:
        vocab[a["content"]] = a["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg.get("chat_template") or (hf_dir / "chat_template.jinja").read_text())
