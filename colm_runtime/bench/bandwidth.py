"""`colm bench bandwidth`: decode step time against the memory-bandwidth bound, per chain count.

A decode step must at least read the weights its chains use and the K/V of its context once; on a
GPU at small batch that read is the bound. For each chain count k and batch size B this reports the
step time, the bytes a step reads (the chain blocks of chains <= k, the first width(k) columns of
the LM head, the K/V of pools < k), the bandwidth that implies, and its fraction of the device's
measured copy bandwidth (a large device-to-device copy: the practical peak).
"""

from __future__ import annotations

import argparse
import json

import torch

from colm_runtime.config import ModelConfig

SIZES = {
    # ~1.07B parameters: the paper's 1B width (2048, 32 heads in chains {8,8,8,8}), 24 layers.
    "1b": dict(vocab_size=32000, n_layers=24, head_dim=64, chains=(8, 8, 8, 8), kv_heads=(2, 2, 2, 2),
               intermediate_size=8192, max_position_embeddings=4096),
    # SmolLM2-135M's shape (one chain of 9 heads, 3 KV heads) and the same width, depth and vocabulary
    # as three chains of 3 heads (issue "real-scale performance").
    "smollm2": dict(vocab_size=49152, n_layers=30, head_dim=64, chains=(9,), kv_heads=(3,),
                    intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=8192),
    "smollm2-3chain": dict(vocab_size=49152, n_layers=30, head_dim=64, chains=(3, 3, 3), kv_heads=(1, 1, 1),
                           intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=8192),
    # A dry run on CPU in seconds.
    "tiny": dict(vocab_size=512, n_layers=2, head_dim=16, chains=(2, 2, 2, 2), kv_heads=(1, 1, 1, 1),
                 intermediate_size=256, max_position_embeddings=1024),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1b", choices=sorted(SIZES))
    p.add_argument("--model", default=None, help="a model directory instead of a random model of --size")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=512, help="tokens already cached per sequence")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object only")


def weight_bytes(model, chains: int) -> int:
    """Bytes of the weights a step at `chains` chains reads (chain blocks < chains, norms, head columns)."""
    cfg, total = model.cfg, 0
    for name, p in model.named_parameters():
        if ".chains." in name:  # ChainLinear block j: ...chains.<j>.weight
            j = int(name.split(".chains.")[1].split(".")[0])
            total += p.numel() * p.element_size() if j < chains else 0
        elif name == "embed.weight" and not cfg.tie_word_embeddings:
            continue  # a lookup of a few rows; the LM head below is the big read
        elif p.dim() == 2:  # the LM head: the first width(k) columns of every row
            total += p.shape[0] * cfg.width(chains) * p.element_size()
        else:  # norm weights
            total += p.numel() * p.element_size() * cfg.width(chains) // p.numel()
    return total


def kv_bytes(cfg: ModelConfig, chains: int, batch: int, context: int, elem: int) -> int:
    heads = sum(cfg.pool_kv_heads[: cfg.pools_for(chains)])
    return 2 * cfg.n_layers * heads * cfg.head_dim * elem * batch * context


def copy_bandwidth(device: str, dtype: torch.dtype, sync) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    import time

    n = (1 << 30) // 2 if torch.device(device).type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> int:
    from colm_runtime.bench.model import DecodeStep, time_side_by_side
    from colm_runtime.model import CoLMModel

    dtype = getattr(torch, args.dtype)
    if args.model:
        from colm_runtime.checkpoint import load_model

        model = load_model(args.model, args.device, dtype)
    else:
        with torch.device(args.device):
            model = CoLMModel(ModelConfig(**SIZES[args.size]))
        model.init_weights(seed=0)
        model = model.to(dtype).eval()
    cfg = model.cfg
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    peak = copy_bandwidth(args.device, dtype, sync)
    elem = torch.empty((), dtype=dtype).element_size()
    out: dict = {"size": args.model or args.size, "params": sum(p.numel() for p in model.parameters()), "device": args.device,
                 "dtype": args.dtype, "context": args.context, "copy_bandwidth_gb_s": round(peak / 1e9, 1),
                 "steps": []}
    for b in args.batch:
        steps = {k: DecodeStep(model, k, b, args.context, args.block_size) for k in range(1, cfg.n_chains + 1)}
        t = time_side_by_side({str(k): s for k, s in steps.items()}, args.rounds, sync)
        for k in steps:
            nbytes = weight_bytes(model, k) + kv_bytes(cfg, k, b, args.context + 1, elem)
            sec = t[str(k)]
            out["steps"].append({"batch": b, "chains": k, "step_ms": round(sec * 1e3, 4),
                                 "decode_tok_s": round(b / sec, 1), "bytes": nbytes,
                                 "bound_ms": round(nbytes / peak * 1e3, 4), "gb_s": round(nbytes / sec / 1e9, 1),
                                 "fraction_of_copy_bw": round(nbytes / sec / peak, 3)})
        del steps
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
