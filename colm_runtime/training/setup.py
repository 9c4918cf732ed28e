"""Assembling a run: tokenizer, model, datasets, from scratch, from `--init` or from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from colm_runtime.checkpoint import TOKENIZER, load_config, load_model
from colm_runtime.model import CoLMModel
from colm_runtime.tokenizer import Tokenizer, train_bpe
from colm_runtime.training.data import CorpusError, PackedDataset, read_documents, split_documents, tokenize
from colm_runtime.training.distributed import DistEnv, barrier
from colm_runtime.training.train_config import TrainConfig


@dataclass
class Run:
    """What the training loop works on (mutable: the model trains)."""

    tokenizer: Tokenizer
    tokenizer_file: Path
    model: CoLMModel
    train: PackedDataset
    val: PackedDataset


def _tokenizer(cfg: TrainConfig, env: DistEnv, train_docs: list[str], resume: bool) -> Path:
    """The tokenizer file of the run: reused (resume, --tokenizer, --init) or trained on rank 0."""
    out = Path(cfg.out) / TOKENIZER
    if resume:
        src = out
    elif cfg.tokenizer:
        src = Path(cfg.tokenizer)
    elif cfg.init:
        src = Path(cfg.init) / TOKENIZER
    else:
        if env.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            train_bpe(train_docs, cfg.vocab_size).save(out)
        barrier(env)
        return out
    if not src.is_file():
        raise CorpusError(f"{src}: tokenizer file not found")
    return src


def build_run(cfg: TrainConfig, env: DistEnv, resume: bool) -> Run:
    """Read the corpus, get the tokenizer and the model, pack the data."""
    docs = read_documents(cfg.data)
    if cfg.val_data:
        train_docs, val_docs = docs, read_documents(cfg.val_data)
    else:
        train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    tok_file = _tokenizer(cfg, env, train_docs, resume)
    try:
        tok = Tokenizer.from_file(tok_file)
    except ValueError as e:
        raise CorpusError(str(e)) from None
    if resume:
        model = CoLMModel(load_config(cfg.out))  # weights come from the checkpoint
    elif cfg.init:
        model = load_model(cfg.init, dtype=torch.float32).train()
    else:
        model = CoLMModel(cfg.model_config(tok.vocab_size)).init_weights(cfg.seed)
    if tok.vocab_size > model.cfg.vocab_size:
        raise CorpusError(f"tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}")
    if cfg.seq_len > model.cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds max_position_embeddings "
                         f"{model.cfg.max_position_embeddings}")
    model = model.to(env.device).train()
    train = PackedDataset(tokenize(train_docs, tok), cfg.seq_len)
    val = PackedDataset(tokenize(val_docs, tok), cfg.seq_len)
    return Run(tok, tok_file, model, train, val)
