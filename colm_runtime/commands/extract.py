"""`colm extract`: the first K chains of a model as a standalone checkpoint."""

from __future__ import annotations

import argparse

from colm_runtime.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="source model directory")
    p.add_argument("--chains", type=int, required=True, help="how many leading chains to keep")
    p.add_argument("out", help="output model directory")


def run(args: argparse.Namespace) -> int:
    from colm_runtime.checkpoint import CheckpointError, extract, load_config

    try:
        n = load_config(args.model).n_chains
        if not 1 <= args.chains <= n:
            raise CLIError(f"--chains must be in 1..{n} for this model, got {args.chains}")
        out = extract(args.model, args.chains, args.out)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    print(f"wrote {args.chains}-chain model to {out}")
    return 0
