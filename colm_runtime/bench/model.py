"""`colm bench model`: the cost of slicing chains out of one weight copy, and CoLM vs dense.

All ratios are measured side by side in one run, with the timed candidates interleaved round by
round so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from colm_runtime.config import ModelConfig
from colm_runtime.model import ChainKVCache, CoLMModel, ForwardBatch, SeqSpec

# The default model's shape, used when it is not there (or with --random).
DEFAULT_SHAPE = dict(vocab_size=8192, n_layers=4, head_dim=32, chains=(2, 2, 2, 2), kv_heads=(1, 1, 1, 1),
                     intermediate_size=768, max_position_embeddings=1024)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: models/colm-tiny, else a random "
                   "model of its shape)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=128, help="tokens already cached per sequence")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """A dense Llama-style model of the same width, depth, head count and FFN width (one chain)."""
    kv = cfg.kv_heads[0] * cfg.n_chains if cfg.kv_sharing else sum(cfg.kv_heads)
    return ModelConfig(vocab_size=cfg.vocab_size, n_layers=cfg.n_layers, head_dim=cfg.head_dim,
                       chains=(cfg.n_heads,), kv_heads=(kv,), intermediate_size=cfg.intermediate_size,
                       max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=cfg.tie_word_embeddings)


def step_flops(cfg: ModelConfig, chains: int, context: int) -> int:
    """Multiply-add FLOPs (x2) of one decode token at `chains` chains: chain blocks, attention, head."""
    ins, hd = cfg.chain_widths, cfg.head_dim
    cum = lambda ws, j: sum(ws[: j + 1])  # noqa: E731
    f = 0
    for j in range(chains):
        qkv_out = (cfg.chains[j] + 2 * cfg.chain_kv_heads[j]) * hd
        f += qkv_out * cum(ins, j) + ins[j] * cum(ins, j)  # qkv, o
        f += 2 * cfg.ffn_widths[j] * cum(ins, j) + ins[j] * cum(cfg.ffn_widths, j)  # gate_up, down
        f += 2 * cfg.chains[j] * hd * context  # scores and weighted sum
    return 2 * (f * cfg.n_layers + cfg.vocab_size * cfg.width(chains))


class DecodeStep:
    """One decode step of `batch` sequences with `context` cached tokens each, ready to time."""

    def __init__(self, model: CoLMModel, chains: int, batch: int, context: int, block_size: int = 16):
        cfg, dev = model.cfg, model.embed.weight.device
        nb = -(-(context + 1) // block_size)
        self.model = model
        self.cache = ChainKVCache(cfg, [nb * batch] * cfg.n_kv_pools, block_size, model.embed.weight.dtype, dev)
        tables = [[list(range(b * nb, (b + 1) * nb))] * cfg.n_kv_pools for b in range(batch)]
        specs = [SeqSpec([7 + b], context, chains, tables[b]) for b in range(batch)]
        self.batch = ForwardBatch.build(cfg, specs, block_size, dev)

    def __call__(self) -> None:
        self.model.forward_step(self.batch, self.cache)


def time_side_by_side(fns: dict[str, Callable[[], None]], rounds: int, sync: Callable[[], None],
                      stat: Callable[[list[float]], float] = statistics.median,
                      warmup: Callable[[], None] | None = None) -> dict[str, float]:
    """Seconds per call of each fn (median by default), interleaving the fns round by round so machine
    noise hits every side alike. Without a warmup, each fn runs three times first."""
    if warmup is not None:
        warmup()
    else:
        for fn in fns.values():
            for _ in range(3):
                fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {k: stat(v) for k, v in times.items()}


def load_or_random(model_dir: str | None, device: str, dtype: torch.dtype) -> tuple[CoLMModel, str]:
    from colm_runtime.checkpoint import load_model
    from colm_runtime.paths import default_model_dir

    path = Path(model_dir) if model_dir else default_model_dir()
    if (path / "model.safetensors").is_file():
        return load_model(path, device, dtype), str(path)
    if model_dir:
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    cfg = ModelConfig(**DEFAULT_SHAPE)
    return CoLMModel(cfg).init_weights(seed=0).to(device, dtype).eval(), "random(colm-tiny shape)"


def run(args: argparse.Namespace) -> int:
    from colm_runtime.checkpoint import extract_state

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, source = load_or_random(args.model, args.device, dtype)
    cfg = model.cfg
    dense = CoLMModel(dense_config(cfg)).init_weights(seed=1).to(args.device, dtype).eval()
    subs = {}
    for k in range(1, cfg.n_chains + 1):
        sub_cfg, state = extract_state(model, k)
        subs[k] = CoLMModel(sub_cfg).to(args.device, dtype).eval()
        subs[k].load_state_dict(state)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out: dict = {"model": source, "device": args.device, "dtype": args.dtype, "context": args.context,
                 "threads": torch.get_num_threads(),
                 "slice_overhead": {}, "vs_dense": {}, "step_ms": {}, "flop_ratio": {}}
    full_flops = step_flops(cfg, cfg.n_chains, args.context)
    for k in range(1, cfg.n_chains + 1):
        out["flop_ratio"][str(k)] = round(step_flops(cfg, k, args.context) / full_flops, 4)
    for b in args.batch:
        fns = {"dense": DecodeStep(dense, 1, b, args.context)}
        for k in range(1, cfg.n_chains + 1):
            fns[f"full{k}"] = DecodeStep(model, k, b, args.context)
            fns[f"sub{k}"] = DecodeStep(subs[k], k, b, args.context)
        t = time_side_by_side(fns, args.rounds, sync)
        ks = range(1, cfg.n_chains + 1)
        out["slice_overhead"][str(b)] = {str(k): round(t[f"full{k}"] / t[f"sub{k}"], 3) for k in ks}
        out["vs_dense"][str(b)] = {str(k): round(t[f"full{k}"] / t["dense"], 3) for k in ks}
        out["step_ms"][str(b)] = {"dense": round(t["dense"] * 1e3, 3),
                                  **{str(k): round(t[f"full{k}"] * 1e3, 3) for k in ks}}
    if not args.json:
        print(f"# colm bench model: {source}, {args.device}/{args.dtype}, context {args.context}")
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
