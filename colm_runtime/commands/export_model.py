"""`colm export hf MODEL_DIR OUT`: a one-chain CoLM model as a Hugging Face LlamaForCausalLM directory."""

from __future__ import annotations

import argparse

from colm_runtime.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a one-chain CoLM model directory")
    p.add_argument("out", help="output directory (must not exist; written atomically)")


def run(args: argparse.Namespace) -> int:
    from colm_runtime.importers.export import export_hf
    from colm_runtime.importers.llama import ImportRefused

    try:
        out = export_hf(args.model, args.out)
    except ImportRefused as e:
        raise CLIError(str(e)) from None
    print(f"exported {args.model} as a Hugging Face Llama directory at {out}")
    return 0
