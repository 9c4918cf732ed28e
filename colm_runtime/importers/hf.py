"""`colm import hf DIR OUT`: a Hugging Face Llama directory as a one-chain CoLM checkpoint.

Reads config.json, model.safetensors (or shards listed in model.safetensors.index.json),
tokenizer.json, tokenizer_config.json (chat template, BOS/EOS, add_bos_token), chat_template.jinja
and generation_config.json (eos ids). Pickle files (pytorch_model.bin) are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from colm_runtime.importers.llama import ImportRefused, LlamaArch, colm_state, hf_names, pick_dtype, write_model_dir
from colm_runtime.tokenizer import Tokenizer, read_json_object

_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_json(path: Path, required: bool = True) -> dict:
    if required and not path.is_file():
        raise ImportRefused(f"{path}: missing")
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ImportRefused(str(e)) from None


def _rope(c: dict, where: str) -> tuple[float, dict | None]:
    """(rope theta, Llama-3 scaling or None) from either the classic keys (rope_theta, rope_scaling)
    or transformers 5's rope_parameters."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ImportRefused(f"{where}: rope_scaling type {kind!r} is not supported (only 'llama3')")
    missing = [k for k in _ROPE_KEYS if k not in scaling]
    if missing:
        raise ImportRefused(f"{where}: rope_scaling lacks {missing}")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in _ROPE_KEYS}}


def read_arch(c: dict, where: str) -> LlamaArch:
    """The LlamaArch of a config.json; refuses what a CoLM cannot represent, naming the field."""
    if c.get("model_type") != "llama":
        raise ImportRefused(f"{where}: model_type {c.get('model_type')!r} is not supported (only 'llama')")
    refusals = {"attention_bias": "biases on q/k/v/o", "mlp_bias": "biases in the MLP",
                "sliding_window": "sliding-window attention", "num_local_experts": "mixture of experts",
                "num_experts": "mixture of experts"}
    for key, what in refusals.items():
        if c.get(key):
            raise ImportRefused(f"{where}: {key} = {c[key]!r}: {what} is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ImportRefused(f"{where}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
    try:
        heads = c["num_attention_heads"]
        theta, scaling = _rope(c, where)
        return LlamaArch(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], n_layers=c["num_hidden_layers"],
                         n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                         head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                         intermediate_size=c["intermediate_size"], rope_theta=theta,
                         norm_eps=c.get("rms_norm_eps", 1e-6),
                         max_position_embeddings=c.get("max_position_embeddings", 2048),
                         tie_word_embeddings=bool(c.get("tie_word_embeddings", False)), rope_scaling=scaling)
    except KeyError as e:
        raise ImportRefused(f"{where}: missing field {e}") from None


class SafetensorsDir:
    """Tensors of model.safetensors or its shards, read one at a time by name."""

    def __init__(self, d: Path):
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ImportRefused(f"{index}: no weight_map")
            self.files = {name: d / f for name, f in weight_map.items()}
        elif (d / "model.safetensors").is_file():
            self.files = {name: d / "model.safetensors" for name in self._keys(d / "model.safetensors")}
        else:
            raise ImportRefused(f"{d}: no model.safetensors or model.safetensors.index.json "
                                "(pickle checkpoints are not read)")
        self._open: dict[Path, object] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ImportRefused(f"{path}: not a readable safetensors file ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ImportRefused(f"missing tensor '{name}'")
        path = self.files[name]
        try:
            if path not in self._open:
                self._open[path] = safe_open(str(path), "pt")
            return self._open[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ImportRefused(f"{path}: tensor '{name}' unreadable ({e})") from None


def tokenizer_files(d: Path) -> tuple[str, dict, dict, str | None]:
    """(tokenizer.json text, tokenizer_config subset, generation_config, chat template) of an HF dir."""
    if not (d / "tokenizer.json").is_file():
        raise ImportRefused(f"{d / 'tokenizer.json'}: missing (only fast tokenizers are supported)")
    tcfg, gen, cfg = read_json(d / "tokenizer_config.json", False), read_json(d / "generation_config.json", False), \
        read_json(d / "config.json")
    tok_json = (d / "tokenizer.json").read_text()
    tokens = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tcfg.items()
              if k in ("bos_token", "eos_token") and v is not None}
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:  # Llama 3 says it through tokenizer.json's post-processor instead
        bos = template_bos(json.loads(tok_json))
        add_bos = bos is not None
        if bos is not None:
            tokens.setdefault("bos_token", bos)
    out = {**tokens, "add_bos_token": bool(add_bos)}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    template = tcfg.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    if not isinstance(template, str):
        template = None  # a list of named templates: not supported, the server's default is used
    gen_out = {}
    if eos is not None:
        gen_out["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
    try:  # check now (ids in range, tokens exist), not when the server starts
        from tokenizers import Tokenizer as HFTokenizer

        Tokenizer(HFTokenizer.from_str(tok_json), gen_out.get("eos_token_id"), out.get("bos_token"))
    except Exception as e:
        raise ImportRefused(f"{d}: tokenizer files: {e}") from None
    return tok_json, out, gen_out, template


def template_bos(tok_json: dict) -> str | None:
    """The special token a tokenizer.json's TemplateProcessing puts before every single sequence."""
    pp = tok_json.get("post_processor") or {}
    for p in (pp.get("processors") or []) if pp.get("type") == "Sequence" else [pp]:
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def import_hf(src: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Import a Hugging Face Llama directory; returns OUT."""
    d = Path(src)
    if not d.is_dir():
        raise ImportRefused(f"{d}: not a directory")
    arch = read_arch(read_json(d / "config.json"), str(d / "config.json"))
    cfg = arch.colm_config(str(d / "config.json"))
    weights = SafetensorsDir(d)
    names = hf_names(cfg.n_layers, cfg.tie_word_embeddings)
    extra = sorted(set(weights.files) - set(names) - {"lm_head.weight"})
    if extra:  # biases, experts, ... that config.json did not announce
        raise ImportRefused(f"{d}: unsupported tensor(s) {extra[:5]} (a dense Llama has none)")
    state = colm_state(cfg, lambda n: _get(weights, n, d), pick_dtype(dtype, cfg), str(d))
    tok_json, tcfg, gen, template = tokenizer_files(d)
    return write_model_dir(out, cfg, state, tok_json, tcfg, gen, template)


def _get(weights: SafetensorsDir, name: str, d: Path) -> torch.Tensor:
    try:
        t = weights.get(name)
    except ImportRefused as e:
        raise ImportRefused(f"{d}: {e}") from None
    if not t.is_floating_point():
        raise ImportRefused(f"{d}: tensor '{name}' has dtype {t.dtype}; quantized safetensors are not supported")
    return t
