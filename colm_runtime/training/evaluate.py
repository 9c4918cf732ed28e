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
def token_logprobs(model: CoLMModel, ids: list[int], chains: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1..len(ids)-1 at `chains` chains, from one full causal forward
    (no KV cache, no batching): the reference the server's prompt logprobs are tested against."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # [1, S]
    hidden = model(x[:, :-1], chains=chains)  # [1, S-1, width(chains)]
    lp = model.logits(hidden[0], chains).float().log_softmax(dim=-1)  # [S-1, V]
    return lp.gather(1, x[0, 1:, None])[:, 0].tolist()


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """lm-evaluation-harness's loglikelihood_rolling windows (context_len 1): (ids, n), where the last n
    of ids[1:] are scored, each token of the document exactly once. The first window starts from the
    prefix token (EOS here); a later one is max_len tokens of context-and-targets ending at its last
    target, so a short last window still sees max_len - n tokens of context."""
    first = min(max_len, len(tokens))
    out = [([prefix] + tokens[:first], first)]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        out.append((tokens[done + n - max_len - 1 : done + n], n))
        done += n
    return out


def rolling_loglikelihood(model: CoLMModel, tokens: list[int], prefix: int, chains: int, max_len: int) -> float:
    """The document's log-likelihood as lm-eval's loglikelihood_rolling defines it, at `chains` chains."""
    return sum(sum(token_logprobs(model, ids, chains)[-n:]) for ids, n in rolling_windows(tokens, prefix, max_len))


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
