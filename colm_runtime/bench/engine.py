"""`colm bench engine`: continuous batching across chain counts, measured end to end.

One run, one JSON object. Every scenario generates the same number of tokens from the same prompts
(greedy, EOS ignored), prefill included; scenarios are interleaved round by round and each reports
its fastest round, so machine noise hits all sides alike. Ratios (goal in brackets):
  mixed_vs_separate         mixed chain counts in one continuous batch / one batch per chain count,
                            one after another [>= 1]
  mixed_vs_padded           mixed / the same requests all at full chains [close to the FLOP ratio]
  continuous_vs_sequential  all requests concurrently / one at a time [>= 8 on 2 CPU cores]; the
                            workload's chain mix on both sides (_full: every request at full chains)
  vs_transformers           ours at full chains / Hugging Face transformers `generate` on a random
                            dense Llama of the full model's shape, at concurrency 1 and N [>= 1]
  air_prefill_speedup       CoLM-Air variant of the model: prompt-only requests at full chains, time
                            with the 1-chain prefill off / on [up to air_prefill_flop_ratio]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import torch

from colm_runtime.bench.model import time_side_by_side
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: models/colm-tiny, else a random "
                   "model of its shape)")
    p.add_argument("--random", default=None, choices=["colm-tiny", "tiny", "1b"],
                   help="a random model of this shape instead of --model (1b: ~1B parameters)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests (equal shares per chain count)")
    p.add_argument("--single", type=int, default=8, help="requests run one at a time (the sequential and the "
                   "concurrency-1 transformers comparisons; the first ones, so every chain count is there)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[32, 96], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default). 1 by default: "
                   "on a shared CPU OpenMP spin-waiting makes more threads slower and erratic (docs/engine.md, Threads on CPU)")
    p.add_argument("--no-transformers", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object only")


class Workload:
    """Prompts (deterministic pseudo-random tokens) and, per request, its chain count in the mixed run."""

    def __init__(self, n: int, n_chains: int, vocab: int, lens: tuple[int, int], out_len: int, seed: int = 0):
        rng = random.Random(seed)
        self.prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*lens))] for _ in range(n)]
        self.chains = [1 + i % n_chains for i in range(n)]
        self.out_len = out_len

    def requests(self, idx: list[int], chains: int | None = None) -> list[EngineRequest]:
        params = SamplingParams(max_tokens=self.out_len, temperature=0.0, ignore_eos=True)
        return [EngineRequest(f"b{i}-{time.perf_counter_ns()}", self.prompts[i], params,
                              chains or self.chains[i]) for i in idx]


def run_batch(engine: LLMEngine, reqs: list[EngineRequest]) -> None:
    """All requests concurrently, to completion."""
    out = engine.generate(reqs)
    assert all(len(c[0].token_ids) == r.params.max_tokens for r, c in zip(reqs, out.values()))


def run_one_by_one(engine: LLMEngine, reqs: list[EngineRequest]) -> None:
    for r in reqs:
        run_batch(engine, [r])


def hf_model(cfg, device: str, dtype: torch.dtype):
    """A randomly initialised LlamaForCausalLM with the full CoLM model's dense shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kv = cfg.kv_heads[0] * cfg.n_chains if cfg.kv_sharing else sum(cfg.kv_heads)
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=kv,
                     head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                     tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=0, eos_token_id=None,
                     bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(hc).to(device=device, dtype=dtype).eval()


def hf_generate(model, prompts: list[list[int]], out_len: int, device: str) -> None:
    """transformers `generate`, greedy, exactly out_len new tokens, prompts left-padded into one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] == width + out_len


def time_rounds(fns: dict[str, Callable[[], None]], rounds: int, sync: Callable[[], None],
                warmup: Callable[[], None]) -> dict[str, float]:
    """Fastest seconds of each scenario, interleaved round by round after a warm-up. The minimum, not
    the median: on a shared machine other processes only ever add time."""
    return time_side_by_side(fns, rounds, sync, stat=min, warmup=warmup)


def scenarios(engine: LLMEngine, w: Workload, n: int, single: int, hf, device: str,
              air: tuple[LLMEngine, LLMEngine] | None = None) -> dict[str, Callable[[], None]]:
    k = engine.cfg.n_chains
    everyone, few = list(range(n)), list(range(single))
    fns: dict[str, Callable[[], None]] = {
        "mixed": lambda: run_batch(engine, w.requests(everyone)),
        "separate": lambda: [run_batch(engine, w.requests([i for i in everyone if w.chains[i] == c]))
                             for c in range(1, k + 1)],
        "padded": lambda: run_batch(engine, w.requests(everyone, chains=k)),
        "sequential": lambda: run_one_by_one(engine, w.requests(few)),
        "full_single": lambda: run_one_by_one(engine, w.requests(few, chains=k)),
    }
    if air is not None:
        prompts = Workload(8, k, engine.cfg.vocab_size, (256, 256), 1, seed=2)
        fns["air_prefill_on"] = lambda: run_batch(air[0], prompts.requests(list(range(8)), chains=k))
        fns["air_prefill_off"] = lambda: run_batch(air[1], prompts.requests(list(range(8)), chains=k))
    if hf is not None:
        fns["hf_batch"] = lambda: hf_generate(hf, w.prompts[:n], w.out_len, device)
        fns["hf_single"] = lambda: [hf_generate(hf, [w.prompts[i]], w.out_len, device) for i in few]
    return fns


def report(t: dict[str, float], w: Workload, engine: LLMEngine, args, source: str) -> dict:
    from colm_runtime.bench.model import step_flops

    cfg, n, single = engine.cfg, args.requests, args.single
    tps = {name: (single if name in ("sequential", "full_single", "hf_single") else n) * w.out_len / sec
           for name, sec in t.items() if not name.startswith("air_")}
    ctx = int(statistics.mean(len(p) for p in w.prompts) + w.out_len / 2)
    flops_mixed = statistics.mean(step_flops(cfg, c, ctx) for c in w.chains[:n])
    out = {
        "model": source, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "requests": n, "prompt_len": args.prompt_len, "output_len": w.out_len, "rounds": args.rounds,
        "mixed_vs_separate": round(tps["mixed"] / tps["separate"], 3),
        "mixed_vs_padded": round(tps["mixed"] / tps["padded"], 3),
        "padded_flop_ratio": round(step_flops(cfg, cfg.n_chains, ctx) / flops_mixed, 3),
        "continuous_vs_sequential": round(tps["mixed"] / tps["sequential"], 3),
        "continuous_vs_sequential_full": round(tps["padded"] / tps["full_single"], 3),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "decode_step_ms_per_chains": {str(k): round(v * 1e3, 3) for k, v in
                                      sorted(engine.stats().step_time_per_chains.items())},
    }
    if "air_prefill_on" in t:
        out["air_prefill_speedup"] = round(t["air_prefill_off"] / t["air_prefill_on"], 3)
        full, one = step_flops(cfg, cfg.n_chains, 128), step_flops(cfg, 1, 128)
        head = 2 * cfg.vocab_size * cfg.width(cfg.n_chains)  # the LM head runs once per prompt, not per token
        out["air_prefill_flop_ratio"] = round((full - head) / (one - 2 * cfg.vocab_size * cfg.width(1)), 3)
    if "hf_batch" in tps:
        out["vs_transformers"] = {"1": round(tps["full_single"] / tps["hf_single"], 3),
                                  str(n): round(tps["padded"] / tps["hf_batch"], 3),
                                  f"{n}_mixed": round(tps["mixed"] / tps["hf_batch"], 3)}
    return out


def run(args: argparse.Namespace) -> int:
    from colm_runtime.bench.model import load_or_random
    from colm_runtime.cli import CLIError
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.requests < 1 or not 1 <= args.single <= args.requests or args.output_len < 1:
        raise CLIError("--requests >= 1, --single in 1..requests and --output-len >= 1 are required")
    dtype = getattr(torch, args.dtype)
    try:
        model, source = random_model(args.random, args.device, dtype) if args.random else \
            load_or_random(args.model, args.device, dtype)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    cfg = model.cfg
    w = Workload(args.requests, cfg.n_chains, cfg.vocab_size, tuple(args.prompt_len), args.output_len)
    longest = max(len(p) for p in w.prompts) + w.out_len
    config = EngineConfig(block_size=args.block_size, max_num_seqs=max(args.requests, 1),
                          max_num_batched_tokens=args.max_num_batched_tokens, device=args.device,
                          kv_cache_memory=_kv_bytes(cfg, args.requests, longest, args.block_size, dtype))
    engine = LLMEngine(model, _tokenizer(source, cfg.vocab_size), config)
    hf = None if args.no_transformers else hf_model(cfg, args.device, dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    fns = scenarios(engine, w, args.requests, args.single, hf, args.device, air_engines(model, config))
    t = time_rounds(fns, args.rounds, sync, lambda: _warmup(engine, w, hf, args.device))
    out = report(t, w, engine, args, source)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def _warmup(engine: LLMEngine, w: Workload, hf, device: str) -> None:
    """A few short runs so that first-call costs (allocator, kernels, lazy init) are not timed."""
    short = Workload(8, engine.cfg.n_chains, engine.cfg.vocab_size, (4, 16), 4, seed=1)
    for _ in range(2):
        run_batch(engine, short.requests(list(range(8))))
        if hf is not None:
            hf_generate(hf, short.prompts, short.out_len, device)


def air_engines(model, config: EngineConfig) -> tuple[LLMEngine, LLMEngine] | None:
    """A random CoLM-Air model of the same shape, with the 1-chain prefill on and off."""
    import dataclasses

    from colm_runtime.model import CoLMModel

    cfg = model.cfg
    if cfg.n_chains == 1:
        return None
    air_cfg = cfg if cfg.kv_sharing else dataclasses.replace(cfg, kv_sharing=True, kv_heads=(cfg.kv_heads[0],))
    p = next(model.parameters())
    with torch.device(p.device):
        air = CoLMModel(air_cfg)
    air = air.init_weights(seed=0).to(p.dtype).eval()
    tok = _tokenizer("", cfg.vocab_size)
    return (LLMEngine(air, tok, config), LLMEngine(air, tok, dataclasses.replace(config, air_prefill_one_chain=False)))


def random_model(shape: str, device: str, dtype: torch.dtype):
    from colm_runtime.bench.bandwidth import SIZES
    from colm_runtime.bench.model import DEFAULT_SHAPE
    from colm_runtime.config import ModelConfig
    from colm_runtime.model import CoLMModel

    cfg = ModelConfig(**(DEFAULT_SHAPE if shape == "colm-tiny" else SIZES[shape]))
    with torch.device(device):
        model = CoLMModel(cfg)
    return model.init_weights(seed=0).to(dtype).eval(), f"random({shape})"


def _kv_bytes(cfg, n: int, tokens: int, block_size: int, dtype: torch.dtype) -> int:
    """Room for n sequences of `tokens` tokens at full chains: no preemption in any scenario."""
    from colm_runtime.model import ChainKVCache

    blocks = n * (-(-tokens // block_size) + 1)
    return blocks * sum(ChainKVCache.block_bytes(cfg, block_size, dtype))


def _tokenizer(source: str, vocab: int):
    """The model's tokenizer, or a small BPE one for a random model (detokenizing is engine work too)."""
    from pathlib import Path

    from colm_runtime.tokenizer import Tokenizer
    from colm_runtime.testing import small_tokenizer

    path = Path(source) / "tokenizer.json"
    return Tokenizer.from_file(path) if path.is_file() else small_tokenizer(vocab)
