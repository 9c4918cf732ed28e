"""`colm expand --model DIR --add-chain C OUT`: add a chain of C heads (progressive scaling).

Continue training with `colm train --init OUT --freeze-chains N` (N = the old chain count) to keep the
old chains bit-identical, or without --freeze-chains to train everything."""

from __future__ import annotations

import argparse
from pathlib import Path

from colm_runtime.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="trained model directory")
    p.add_argument("--add-chain", required=True, type=int, metavar="C", help="heads of the new chain")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads of the new chain (plain CoLM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new chain's initialisation")
    p.add_argument("out", type=Path, help="output model directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from colm_runtime.checkpoint import TOKENIZER, CheckpointError, load_model, save_model
    from colm_runtime.training.expand import ExpandError, expand_model

    try:
        old = load_model(args.model, dtype=torch.float32)
        new = expand_model(old, args.add_chain, args.kv_heads, args.seed)
    except (CheckpointError, ExpandError) as e:
        raise CLIError(str(e)) from None
    tok = args.model / TOKENIZER
    save_model(new, args.out, tok if tok.is_file() else None)
    print(f"chains {list(old.cfg.chains)} -> {list(new.cfg.chains)} -> {args.out}; continue with "
          f"`colm train --init {args.out} --freeze-chains {old.cfg.n_chains} ...` to keep the old chains fixed")
    return 0
