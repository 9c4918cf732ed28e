"""Evaluation: validation loss / perplexity per chain count, decode speed per chain count, and the
training FLOPs estimate used for loss-vs-compute plots."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from colm_runtime.model import ChainKVCache, CoLMModel, ForwardBatch, SeqSpec
from colm_runtime.training.data import PackedDataset
from colm_runtime.training.loss import scale_losses
from colm_runtime.training.optim import chain_of


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def val_losses(model: CoLMModel, ds: PackedDataset, batch_size: int, max_tokens: int | None = None,
               losses_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[int, float]:
    """Mean next-token loss of every chain count 1..n over the dataset's windows in order.
    losses_fn(windows [B, S+1]) -> [n] losses replaces the model's own forward (FSDP: the sharded root)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = model.cfg.n_chains
    fn = losses_fn or (lambda w: torch.stack(scale_losses(model, w, n)))
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    for w in ds.eval_batches(batch_size, max_tokens):
        with autocast(device):
            losses = fn(w.to(device))
        tokens = w.shape[0] * (w.shape[1] - 1)
        sums += losses.double().cpu() * tokens
        count += tokens
    model.train(was_training)
    return {k + 1: float(sums[k] / count) for k in range(n)}


def perplexities(losses: dict[int, float]) -> dict[int, float]:
    return {k: math.exp(v) for k, v in losses.items()}


def active_params(model: CoLMModel, chains: int) -> int:
    """Weights a forward at `chains` chains multiplies with (Chain-of-Linear blocks of chains < k and the
    LM head's first width(k) columns; the embedding is a lookup and costs no FLOPs)."""
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.named_parameters()
            if (c := chain_of(name)) is not None and c < chains)
    return n + cfg.vocab_size * cfg.width(chains)


def train_flops_per_token(model: CoLMModel, chains: int, seq_len: int) -> float:
    """Kaplan et al.'s estimate: 6 N + 6 n_layers seq_len width (attention scores and mixing)."""
    return 6.0 * active_params(model, chains) + 6.0 * model.cfg.n_layers * seq_len * model.cfg.width(chains)


@torch.inference_mode()
def decode_tokens_per_second(model: CoLMModel, chains: int, prompt_len: int = 32, new_tokens: int = 64,
                             block_size: int = 16, warmup: int = 4) -> float:
    """Greedy single-sequence decode speed at `chains` chains over the paged KV cache (batch 1)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = prompt_len + new_tokens + warmup
    nb = -(-total // block_size)
    cache = ChainKVCache(cfg, [nb] * cfg.n_kv_pools, block_size, dtype, device)
    tables = [list(range(nb))] * cfg.pools_for(chains)  # a trivial contiguous block table per pool
    prompt = [(7 * i + 3) % cfg.vocab_size for i in range(prompt_len)]
    logits = model.forward_step(ForwardBatch.build(cfg, [SeqSpec(prompt, 0, chains, tables)], block_size, device), cache)
    ctx = prompt_len
    for i in range(warmup + new_tokens):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        tok = int(logits[0].argmax())
        batch = ForwardBatch.build(cfg, [SeqSpec([tok], ctx, chains, tables)], block_size, device)
        logits = model.forward_step(batch, cache)
        ctx += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)
