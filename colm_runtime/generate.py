"""Single-sequence generation straight on the model and a contiguous KV cache.

A small reference path for `colm generate` and tests; serving goes through the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from colm_runtime.model import ChainKVCache, CoLMModel, ForwardBatch, SeqSpec


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """One token from logits [V]: greedy when temperature is 0, else top-k / top-p sampling."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(model: CoLMModel, prompt: list[int], chains: int, max_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                    eos_token_ids: Iterable[int] = (), block_size: int = 16) -> Iterator[int]:
    """Yield up to max_tokens new token ids, stopping after any of eos_token_ids."""
    cfg = model.cfg
    cfg.check_chains(chains)
    if not prompt:
        raise ValueError("prompt is empty")
    total = len(prompt) + max_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                         f"context of {cfg.max_position_embeddings} tokens")
    device = model.embed.weight.device
    n_blocks = -(-total // block_size)
    cache = ChainKVCache(cfg, [n_blocks] * cfg.n_kv_pools, block_size, model.embed.weight.dtype, device)
    tables = [list(range(n_blocks))] * cfg.n_kv_pools
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens, ctx = list(prompt), 0
    for _ in range(max_tokens):
        batch = ForwardBatch.build(cfg, [SeqSpec(tokens[ctx:], ctx, chains, tables)], block_size, device)
        logits = model.forward_step(batch, cache)[0]
        ctx = len(tokens)
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        tokens.append(nxt)
        yield nxt
        if nxt in eos_token_ids:
            return
