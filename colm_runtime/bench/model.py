"""`colm bench model`: the cost of slicing chains out of one weight copy, CoLM vs dense, and the
chain dividend.

The dividend of a batch is its measured step time as a share of the all-chains step, divided by its
FLOP share: 1.0 means a request pays exactly for the chains it uses. It is reported for every uniform
chain count and for the equal mix (the batch split evenly over 1..n chains). All ratios are measured
side by side in one run, with the timed candidates interleaved round by round so machine noise hits
both sides alike. `--random NAME` benches a random model of a named shape (`--save DIR` writes it).
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
    from colm_runtime.bench.bandwidth import SIZES

    p.add_argument("--model", default=None, help="model directory (default: models/colm-tiny, else a random "
                   "model of its shape)")
    p.add_argument("--random", default=None, choices=sorted(SIZES), help="a random model of this shape instead "
                   "(smollm2: SmolLM2-135M's; smollm2-3chain: the same width, depth and vocabulary in chains "
                   "[3, 3, 3])")
    p.add_argument("--save", default=None, metavar="DIR", help="with --random: write the model directory "
                   "(config.json, model.safetensors) and exit")
    p.add_argument("--dividend-only", action="store_true", help="time the chain counts and the mix of the "
                   "model only (no dense model, no extracted sub-models)")
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

    def __init__(self, model: CoLMModel, chains: int | list[int], batch: int, context: int, block_size: int = 16):
        """chains: one count for every row, or one per row (a mixed batch)."""
        cfg, dev = model.cfg, model.embed.weight.device
        nb = -(-(context + 1) // block_size)
        ks = [chains] * batch if isinstance(chains, int) else list(chains)
        self.model = model
        self.cache = ChainKVCache(cfg, [nb * batch] * cfg.n_kv_pools, block_size, model.embed.weight.dtype, dev)
        tables = [[list(range(b * nb, (b + 1) * nb))] * cfg.pools_for(ks[b]) for b in range(batch)]
        specs = [SeqSpec([7 + b], context, ks[b], tables[b]) for b in range(batch)]
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


def equal_mix(n_chains: int, batch: int) -> list[int]:
    """Chain count of each row of a batch split evenly over 1..n_chains (lowest first)."""
    return [1 + i * n_chains // batch for i in range(batch)]


def dividend(cfg: ModelConfig, t: dict[str, float], batch: int, context: int) -> dict:
    """Measured share of the all-chains step / FLOP share, for each uniform count and the equal mix.
    t: seconds per step of 'full1'..'full<n>' and 'mix'."""
    n, full = cfg.n_chains, step_flops(cfg, cfg.n_chains, context)
    flop = {str(k): step_flops(cfg, k, context) / full for k in range(1, n)}
    flop["mix"] = sum(step_flops(cfg, k, context) for k in equal_mix(n, batch)) / (batch * full)
    share = {k: t["mix" if k == "mix" else f"full{k}"] / t[f"full{n}"] for k in flop}
    return {"share": {k: round(v, 3) for k, v in share.items()},
            "flop_share": {k: round(v, 3) for k, v in flop.items()},
            "dividend": {k: round(share[k] / flop[k], 3) for k in flop}}


def random_model(name: str, device: str, dtype: torch.dtype) -> CoLMModel:
    """A random model of a named shape (bandwidth.SIZES), seeded: the same weights every time."""
    from colm_runtime.bench.bandwidth import SIZES

    return CoLMModel(ModelConfig(**SIZES[name])).init_weights(seed=0).to(device, dtype).eval().column_major_head()


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
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.random:
        model, source = random_model(args.random, args.device, dtype), f"random({args.random})"
    elif args.save:
        raise SystemExit("--save needs --random")
    else:
        model, source = load_or_random(args.model, args.device, dtype)
    if args.save:
        from colm_runtime.checkpoint import save_model

        print(f"wrote {save_model(model, args.save)}")
        return 0
    cfg = model.cfg
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out: dict = {"model": source, "device": args.device, "dtype": args.dtype, "context": args.context,
                 "threads": torch.get_num_threads(), "step_ms": {}, "flop_ratio": {}, "dividend": {}}
    full_flops = step_flops(cfg, cfg.n_chains, args.context)
    for k in range(1, cfg.n_chains + 1):
        out["flop_ratio"][str(k)] = round(step_flops(cfg, k, args.context) / full_flops, 4)
    others = {} if args.dividend_only else comparison_models(model, args.device, dtype)
    if others:
        out.update(slice_overhead={}, vs_dense={})
    ks = range(1, cfg.n_chains + 1)
    for b in args.batch:
        fns = {f"full{k}": DecodeStep(model, k, b, args.context) for k in ks}
        if cfg.n_chains > 1:
            fns["mix"] = DecodeStep(model, equal_mix(cfg.n_chains, b), b, args.context)
        fns.update({name: DecodeStep(m, k, b, args.context) for name, (m, k) in others.items()})
        t = time_side_by_side(fns, args.rounds, sync)
        out["step_ms"][str(b)] = {name.removeprefix("full"): round(sec * 1e3, 3) for name, sec in t.items()
                                  if not name.startswith("sub")}
        if cfg.n_chains > 1:
            out["dividend"][str(b)] = dividend(cfg, t, b, args.context)
        if others:
            out["slice_overhead"][str(b)] = {str(k): round(t[f"full{k}"] / t[f"sub{k}"], 3) for k in ks}
            out["vs_dense"][str(b)] = {str(k): round(t[f"full{k}"] / t["dense"], 3) for k in ks}
    if not args.json:
        print(f"# colm bench model: {source}, {args.device}/{args.dtype}, context {args.context}")
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def comparison_models(model: CoLMModel, device: str, dtype: torch.dtype) -> dict[str, tuple[CoLMModel, int]]:
    """name -> (model, chains) timed beside the model: a dense model of its size ('dense') and its
    first k chains extracted as standalone checkpoints ('sub<k>')."""
    from colm_runtime.checkpoint import extract_state

    cfg = model.cfg
    out = {"dense": (CoLMModel(dense_config(cfg)).init_weights(seed=1).to(device, dtype).eval(), 1)}
    for k in range(1, cfg.n_chains + 1):
        sub_cfg, state = extract_state(model, k)
        sub = CoLMModel(sub_cfg).to(device, dtype).eval()
        sub.load_state_dict(state)
        out[f"sub{k}"] = (sub, k)
    return out
