"""`colm bench prefill`: CoLM-Air first-chain prefill against full-chain prefill, per prompt length.

One request per run, prompt of L tokens at full chains, one output token, chunked by the engine's
token budget (--max-num-batched-tokens) exactly as served. "first_chain" computes the prompt at 1
chain (EngineConfig.air_prefill_one_chain), "full" at every chain; both are timed side by side,
interleaved round by round, fastest round each. Per model and length:
  speedup     full seconds / first-chain seconds
  flop_ratio  the same ratio in FLOPs (chain blocks + attention; the LM head runs once per prompt):
              what an accelerator bound by arithmetic approaches. On a CPU the small first-chain
              matmuls run further from peak, so the measured speedup stays below it.
Models: the default CoLM-Air model (models/colm-tiny-air, else a random model of its shape) and a
random CoLM-Air model with {8,8,8,8} chains (--random-shape: air-8x4, small enough for a CPU; 1b on
a GPU), the paper's setting at a size this machine can run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from colm_runtime.bench import add_run_arguments
from colm_runtime.bench.engine import _tokenizer, time_rounds
from colm_runtime.bench.model import step_flops
from colm_runtime.config import ModelConfig
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams

SHAPES = {
    "air-8x4": dict(vocab_size=8192, n_layers=4, head_dim=32, chains=(8, 8, 8, 8), kv_heads=(2,),
                    intermediate_size=2816, max_position_embeddings=8192, kv_sharing=True),
    "1b": dict(vocab_size=32000, n_layers=24, head_dim=64, chains=(8, 8, 8, 8), kv_heads=(2,),
               intermediate_size=5632, max_position_embeddings=16384, kv_sharing=True),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="CoLM-Air model directory (default: models/colm-tiny-air)")
    p.add_argument("--random-shape", default="air-8x4", choices=[*SHAPES, "none"],
                   help="also a random CoLM-Air model of this {8,8,8,8} shape ('none': skip)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk (token budget)")
    p.add_argument("--rounds", type=int, default=2)
    add_run_arguments(p)


def prefill_flop_ratio(cfg: ModelConfig, length: int) -> float:
    """FLOPs of a full-chain prefill / a first-chain prefill of `length` tokens (last token at full)."""
    n = cfg.n_chains
    head = {k: 2 * cfg.vocab_size * cfg.width(k) for k in (1, n)}
    full = sum(step_flops(cfg, n, c) - head[n] for c in range(1, length + 1)) + head[n]
    one = sum(step_flops(cfg, 1, c) - head[1] for c in range(1, length)) + step_flops(cfg, n, length)
    return full / one


def air_models(args) -> list[tuple[str, torch.nn.Module]]:
    from colm_runtime.checkpoint import load_model
    from colm_runtime.model import CoLMModel
    from colm_runtime.paths import MODELS_DIR

    dtype = getattr(torch, args.dtype)
    path = args.model or str(MODELS_DIR / "colm-tiny-air")
    try:
        out = [(path, load_model(path, args.device, dtype))]
    except FileNotFoundError:
        if args.model:
            raise
        from colm_runtime.bench.model import DEFAULT_SHAPE
        cfg = ModelConfig(**{**DEFAULT_SHAPE, "kv_sharing": True, "kv_heads": (1,)})
        out = [("random(colm-tiny-air shape)", CoLMModel(cfg).init_weights(seed=0).to(args.device, dtype).eval())]
    if args.random_shape != "none":
        with torch.device(args.device):
            model = CoLMModel(ModelConfig(**SHAPES[args.random_shape]))
        out.append((f"random({args.random_shape})", model.init_weights(seed=0).to(dtype).eval()))
    assert all(m.cfg.kv_sharing for _, m in out), "first-chain prefill is for CoLM-Air models"
    return out


def bench_model(name: str, model, args) -> dict:
    cfg = model.cfg
    # + 1 output token must fit: longer lengths are cut to the model's context (reported as skipped)
    lengths = sorted({min(L, cfg.max_position_embeddings - 1) for L in args.lengths})
    config = EngineConfig(block_size=16, max_num_seqs=1, max_num_batched_tokens=args.max_num_batched_tokens,
                          device=args.device, kv_cache_memory=_kv_bytes(cfg, max(lengths) + 1, model),
                          air_prefill_one_chain=True)
    tok = _tokenizer(name, cfg.vocab_size)
    engines = {"first_chain": LLMEngine(model, tok, config),
               "full": LLMEngine(model, tok, dataclasses.replace(config, air_prefill_one_chain=False))}
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompt = [1 + (i * 7919) % (cfg.vocab_size - 1) for i in range(max(lengths))]

    def run(engine: LLMEngine, L: int):
        return lambda: engine.generate([EngineRequest(f"p{L}", prompt[:L], params, cfg.n_chains)])

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    fns = {f"{mode}/{L}": run(e, L) for L in lengths for mode, e in engines.items()}
    t = time_rounds(fns, args.rounds, sync, lambda: [run(e, 64)() for e in engines.values()])
    skipped = [L for L in args.lengths if L >= cfg.max_position_embeddings]
    rows = {str(L): {"full_s": round(t[f"full/{L}"], 4), "first_chain_s": round(t[f"first_chain/{L}"], 4),
                     "speedup": round(t[f"full/{L}"] / t[f"first_chain/{L}"], 3),
                     "flop_ratio": round(prefill_flop_ratio(cfg, L), 3)} for L in lengths}
    if skipped:
        rows["cut_to_context"] = skipped
    return rows


def _kv_bytes(cfg: ModelConfig, tokens: int, model) -> int:
    from colm_runtime.model import ChainKVCache

    return (-(-tokens // 16) + 1) * sum(ChainKVCache.block_bytes(cfg, 16, next(model.parameters()).dtype))


def run(args: argparse.Namespace) -> int:
    from colm_runtime.cli import CLIError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 1 or min(args.lengths) < 2:
        raise CLIError("--rounds >= 1 and --lengths >= 2 are required")
    try:
        models = air_models(args)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    per_model = {name: bench_model(name, m, args) for name, m in models}
    out = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "chunk": args.max_num_batched_tokens, "rounds": args.rounds,
           "speedup": {n: {L: r["speedup"] for L, r in rs.items() if L.isdigit()} for n, rs in per_model.items()},
           "flop_ratio": {n: {L: r["flop_ratio"] for L, r in rs.items() if L.isdigit()} for n, rs in per_model.items()},
           "models": per_model}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
