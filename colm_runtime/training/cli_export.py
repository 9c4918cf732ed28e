"""`colm export checkpoint CKPT OUT`: the model directory of a sharded (FSDP) training checkpoint,
assembled in one process on CPU without a process group (fp32, as `colm train` writes it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from colm_runtime.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="RUN/checkpoint of `colm train --parallel fsdp` (or RUN)")
    p.add_argument("out", type=Path, help="output model directory")


def run(args: argparse.Namespace) -> int:
    from colm_runtime.checkpoint import TOKENIZER, CheckpointError, save_model
    from colm_runtime.training.fsdp import load_full_model
    from colm_runtime.training.state import ResumeError
    from colm_runtime.training.trainer import CHECKPOINT

    ckpt = args.checkpoint / CHECKPOINT if (args.checkpoint / CHECKPOINT).is_dir() else args.checkpoint
    try:
        model = load_full_model(ckpt)
    except (CheckpointError, ResumeError) as e:
        raise CLIError(str(e)) from None
    out = save_model(model, args.out, ckpt / TOKENIZER)
    print(f"wrote {out} ({model.cfg.n_chains} chains, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")
    return 0
