"""Factories for small random CoLM models, for tests and benchmarks (no downloads, seconds to build)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from colm_runtime.checkpoint import save_model
from colm_runtime.config import ModelConfig
from colm_runtime.model import CoLMModel
from colm_runtime.tokenizer import Tokenizer, train_bpe


def sample_text() -> list[str]:
    """English text that ships with Python itself: docstrings of a few standard modules."""
    import argparse, collections, json, pathlib, textwrap, unittest  # noqa: E401

    docs = []
    for mod in (argparse, collections, json, pathlib, textwrap, unittest, inspect):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                docs.append(doc)
    return docs


_TOKENIZERS: dict[int, Tokenizer] = {}


def small_tokenizer(vocab_size: int = 512) -> Tokenizer:
    if vocab_size not in _TOKENIZERS:
        _TOKENIZERS[vocab_size] = train_bpe(sample_text(), vocab_size)
    return _TOKENIZERS[vocab_size]


def small_config(chains=(2, 2, 2, 2), kv_sharing: bool = False, vocab_size: int = 512, n_layers: int = 2,
                 head_dim: int = 8, kv_per_chain: int = 1, ffn_mult: int = 4, **kw) -> ModelConfig:
    chains = tuple(chains)
    kv = (kv_per_chain,) if kv_sharing else tuple(kv_per_chain for _ in chains)
    return ModelConfig(vocab_size=vocab_size, n_layers=n_layers, head_dim=head_dim, chains=chains,
                       kv_heads=kv, intermediate_size=ffn_mult * sum(chains) * head_dim,
                       kv_sharing=kv_sharing, **{"max_position_embeddings": 512, **kw})


def random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> CoLMModel:
    # A larger init than training's, so that chains matter and greedy outputs are not degenerate.
    return CoLMModel(cfg).init_weights(seed=seed, std=0.08).to(dtype).eval()


def make_model_dir(path: str | Path, cfg: ModelConfig | None = None, seed: int = 0) -> Path:
    """Write a random model directory (config.json, model.safetensors, tokenizer.json)."""
    cfg = cfg or small_config()
    tok = small_tokenizer(cfg.vocab_size)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path / "tokenizer.json")
    return save_model(random_model(cfg, seed), path)
