"""`colm generate`: a quick look at a model from the shell."""

from __future__ import annotations

import argparse
import sys

from colm_runtime.cli import CLIError
from colm_runtime.paths import default_model_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, help="model directory (default: models/colm-tiny)")
    p.add_argument("--chains", type=int, default=None, help="chain count 1..n (default: all chains)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    import torch

    from colm_runtime.checkpoint import CheckpointError, load_model
    from colm_runtime.generate import generate_tokens
    from colm_runtime.tokenizer import Tokenizer

    from colm_runtime.importers.llama import ImportRefused
    from colm_runtime.importers.packaged import resolve_model

    try:
        model_dir = resolve_model(args.model) or default_model_dir()
        model = load_model(model_dir, args.device, getattr(torch, args.dtype) if args.dtype else None)
        tok = Tokenizer.from_model_dir(model_dir)
    except (CheckpointError, ImportRefused, ValueError) as e:
        raise CLIError(str(e)) from None
    n = model.cfg.n_chains
    chains = n if args.chains is None else args.chains
    if not 1 <= chains <= n:
        raise CLIError(f"--chains must be in 1..{n} for this model, got {chains}")
    if args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise CLIError("--max-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    prompt = tok.encode(args.prompt, add_bos=True)
    if not prompt:
        raise CLIError("the prompt is empty")
    try:
        ids = list(generate_tokens(model, prompt, chains, args.max_tokens, args.temperature, args.top_k,
                                   args.top_p, args.seed, tok.eos_token_ids))
    except ValueError as e:
        raise CLIError(str(e)) from None
    sys.stdout.write(args.prompt + tok.decode(ids) + "\n")
    return 0
