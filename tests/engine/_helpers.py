"""Factories for the engine tests: small models with diverse greedy outputs, engines, requests."""

from __future__ import annotations

import itertools

import torch

from colm_runtime.config import ModelConfig
from colm_runtime.engine.block_manager import BlockManager
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.detokenizer import IncrementalDetokenizer
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.scheduler import Scheduler
from colm_runtime.engine.sequence import Request, Sequence
from colm_runtime.engine.step_types import RunnerOutput, SchedulerOutput
from colm_runtime.engine.types import EngineRequest, SamplingParams
from colm_runtime.model import ChainKVCache, CoLMModel
from colm_runtime.testing import small_config, small_tokenizer

_ids = itertools.count()
_prompts = itertools.count(1)
_MODELS: dict[tuple, CoLMModel] = {}

# testing.random_model's init (std 0.08) makes every greedy continuation one repeated token, which
# would let a batch-invariance test pass by accident; std 0.5 gives varied continuations.
DIVERSE_STD = 0.5


def diverse_model(kv_sharing: bool = False, seed: int = 0, **kw) -> CoLMModel:
    key = (kv_sharing, seed, tuple(sorted(kw.items())))
    if key not in _MODELS:
        cfg = small_config(kv_sharing=kv_sharing, **kw)
        _MODELS[key] = CoLMModel(cfg).init_weights(seed=seed, std=DIVERSE_STD).eval()
    return _MODELS[key]


def make_engine(model: CoLMModel | None = None, **config) -> LLMEngine:
    model = model or diverse_model()
    config = {"kv_cache_memory": 1 << 22, "block_size": 4, **config}
    return LLMEngine(model, small_tokenizer(model.cfg.vocab_size), EngineConfig(**config))


def req(prompt: list[int], chains: int = 4, max_tokens: int = 8, rid: str | None = None,
        min_chains: int | None = None, priority: int = 0, **params) -> EngineRequest:
    params = {"temperature": 0.0, "ignore_eos": True, "max_tokens": max_tokens, **params}
    return EngineRequest(rid or f"req-{next(_ids)}", list(prompt), SamplingParams(**params), chains,
                         min_chains=min_chains, priority=priority)


def prompt(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    """A deterministic pseudo-random prompt of n tokens (no EOS: id 0 is the special token)."""
    return [1 + (seed * 7919 + i * 104729) % (vocab - 1) for i in range(n)]


def make_seq(cfg: ModelConfig, n_tokens: int, chains: int, min_chains: int | None = None, priority: int = 0,
             n: int = 1, **params) -> Sequence:
    """A sequence of a fresh request, for block-manager and scheduler tests. Each gets its own prompt, so
    that none finds another's blocks in the prefix cache unless a test means it to."""
    r = Request(req(prompt(n_tokens, seed=next(_prompts)), chains=chains, min_chains=min_chains, priority=priority,
                    n=n, **params))
    detok = IncrementalDetokenizer(small_tokenizer(cfg.vocab_size), r.req.params.stop)
    seq = Sequence(r, 0, r.req.prompt_token_ids, cfg.n_kv_pools, None, detok)
    r.seqs.append(seq)
    return seq


def scheduler(blocks=(64, 64, 64, 64), block_size: int = 4, model_len: int = 1024, **config
              ) -> tuple[Scheduler, BlockManager]:
    """A real scheduler over a real block manager (no model: tests play the runner with sampled())."""
    bm = block_manager(blocks=blocks, block_size=block_size)
    return Scheduler(EngineConfig(block_size=block_size, **config), bm, small_tokenizer(bm.cfg.vocab_size),
                     model_len), bm


def sampled(so: SchedulerOutput, token: int = 1) -> RunnerOutput:
    """A runner's output for so without a model: every sampling sequence draws `token`."""
    return RunnerOutput(tokens={s.seq_id: [(token, None)] for seqs in so.samples.values() for s in seqs})


def kv_bytes(cfg: ModelConfig, blocks_per_pool: int, block_size: int = 4) -> int:
    """The kv_cache_memory that gives every pool (equal weights) blocks_per_pool blocks."""
    return blocks_per_pool * sum(ChainKVCache.block_bytes(cfg, block_size, torch.float32))


def block_manager(blocks=(8, 8, 8, 8), block_size: int = 4, **cfg_kw) -> BlockManager:
    cfg = small_config(**cfg_kw)
    return BlockManager(cfg, tuple(blocks), block_size)


def assert_all_free(engine: LLMEngine) -> None:
    """Nothing is referenced: every block is free or cached-and-unreferenced, and emptying the prefix
    cache gives every pool back its full free list."""
    assert_blocks_free(engine.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests


def assert_blocks_free(bm: BlockManager) -> None:
    for pool in bm.pools:
        assert not any(pool.ref), "a block still has a reference"
        idle = set(pool.cached.idle)
        assert idle == set(pool.cached.hash_of), "a named block is neither referenced nor idle"
        assert not idle & set(pool.free) and len(pool.free) + len(idle) == pool.num_blocks, "free list corrupt"
    assert bm.num_free == bm.num_total, f"leaked blocks: free {bm.num_free} of {bm.num_total}"
    bm.evict_all()
    for pool in bm.pools:
        assert sorted(pool.free) == list(range(pool.num_blocks)), "free list corrupt (duplicates?)"
        assert not pool.cached.by_hash and not pool.cached.hash_of and not pool.cached.idle
