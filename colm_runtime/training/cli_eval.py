"""`colm eval --model DIR [--data FILES] [--json]`: perplexity and decode speed per chain count."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from colm_runtime.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model directory (default: models/colm-tiny)")
    p.add_argument("--data", nargs="+", default=None,
                   help="held-out text files or directories (default: sample text shipped with Python)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per decode-speed measurement (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from colm_runtime.checkpoint import TOKENIZER, CheckpointError, load_model
    from colm_runtime.paths import default_model_dir
    from colm_runtime.tokenizer import Tokenizer
    from colm_runtime.training.data import CorpusError, PackedDataset, read_documents, tokenize
    from colm_runtime.training.evaluate import decode_tokens_per_second, val_losses

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    try:
        model = load_model(model_dir, device=args.device, dtype=torch.float32)
        tok = Tokenizer.from_file(model_dir / TOKENIZER)
        if args.data:
            docs = read_documents(args.data)
        else:
            from colm_runtime.testing import sample_text
            docs = sample_text()
        seq_len = min(args.seq_len, model.cfg.max_position_embeddings)
        ds = PackedDataset(tokenize(docs, tok), seq_len)
    except (CheckpointError, CorpusError, ValueError) as e:
        raise CLIError(str(e)) from None
    losses = val_losses(model, ds, args.batch_size, args.max_tokens)
    result = {
        "model": str(model_dir), "chains": list(model.cfg.chains),
        "tokens": min(ds.num_tokens, args.max_tokens or ds.num_tokens),
        "loss": {str(k): v for k, v in losses.items()},
        "perplexity": {str(k): float(torch.tensor(v).exp()) for k, v in losses.items()},
        "tokens_per_second": {str(k): decode_tokens_per_second(model, k, new_tokens=args.decode_tokens)
                              for k in range(1, model.cfg.n_chains + 1)} if args.decode_tokens > 0 else {},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{model_dir}: chains {result['chains']}, {result['tokens']} tokens")
    print("chains  perplexity  decode tok/s")
    for k in result["perplexity"]:
        tps = result["tokens_per_second"].get(k)
        print(f"{k:>6}  {result['perplexity'][k]:>10.2f}  {tps if tps is None else round(tps, 1)!s:>12}")
    return 0
