"""`colm import hf DIR OUT` / `colm import gguf FILE OUT`: a dense Llama-family checkpoint as a one-chain
CoLM model directory (docs/models.md)."""

from __future__ import annotations

import argparse

from colm_runtime.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=["hf", "gguf"], help="hf: a Hugging Face directory; gguf: a GGUF file")
    p.add_argument("src", help="the Hugging Face directory or GGUF file")
    p.add_argument("out", help="output model directory (must not exist; written atomically)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="stored dtype (default auto: bfloat16 from 1B parameters on, else float32)")


def run(args: argparse.Namespace) -> int:
    from colm_runtime.importers.llama import ImportRefused

    if args.source == "hf":
        from colm_runtime.importers.hf import import_hf as do_import
    else:
        from colm_runtime.importers.gguf_file import import_gguf as do_import
    try:
        out = do_import(args.src, args.out, args.dtype)
    except ImportRefused as e:
        raise CLIError(str(e)) from None
    print(f"imported {args.src} as a one-chain CoLM model at {out}")
    return 0
