"""`colm eval --model DIR [--data FILES] [--json]`: perplexity and decode speed per chain count.

`--rolling`: instead, each document's log-likelihood as lm-evaluation-harness's loglikelihood_rolling
defines it (from a leading EOS, windows of --max-length), summed per chain count, with the harness's
word_perplexity, byte_perplexity and bits_per_byte: the reference for docs/evaluation.md.
"""

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
    p.add_argument("--rolling", action="store_true",
                   help="per-document log-likelihood as lm-eval's loglikelihood_rolling (files: .txt, .jsonl)")
    p.add_argument("--max-length", type=int, default=None,
                   help="--rolling: window length, as lm-eval's max_length (default: the model's context - 1)")


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
        ds = None if args.rolling else PackedDataset(tokenize(docs, tok), seq_len)
    except (CheckpointError, CorpusError, ValueError) as e:
        raise CLIError(str(e)) from None
    if args.rolling:
        return _print(rolling(model, tok, docs, args, model_dir), args.json)
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


def rolling(model, tok, docs: list[str], args: argparse.Namespace, model_dir: Path) -> dict:
    """Per chain count: the summed rolling log-likelihood of the documents and the harness's metrics
    (word_perplexity = exp(-ll / words), words as re.split(r"\\s+"); byte_perplexity and bits_per_byte
    over UTF-8 bytes), plus the token perplexity."""
    import math
    import re

    from colm_runtime.training.evaluate import rolling_loglikelihood

    max_len = args.max_length or model.cfg.max_position_embeddings - 1
    ids = tok.encode_batch(docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    tokens = sum(len(i) for i in ids)
    out: dict = {"model": str(model_dir), "documents": len(docs), "tokens": tokens, "words": words, "bytes": nbytes,
                 "max_length": max_len, "chains": {}}
    for k in range(1, model.cfg.n_chains + 1):
        ll = sum(rolling_loglikelihood(model, i, tok.eos_token_id, k, max_len) for i in ids)
        out["chains"][str(k)] = {"loglikelihood": ll, "token_perplexity": math.exp(-ll / tokens),
                                 "word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
                                 "bits_per_byte": -ll / nbytes / math.log(2)}
    return out


def _print(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}: {result['documents']} documents, {result['tokens']} tokens (rolling, max_length "
          f"{result['max_length']})")
    print("chains  loglikelihood  token_ppl  word_ppl  byte_ppl  bits_per_byte")
    for k, r in result["chains"].items():
        print(f"{k:>6}  {r['loglikelihood']:>13.3f}  {r['token_perplexity']:>9.3f}  {r['word_perplexity']:>8.3f}  "
              f"{r['byte_perplexity']:>8.4f}  {r['bits_per_byte']:>13.4f}")
    return 0
