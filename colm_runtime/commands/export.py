"""`colm export FORMAT ...`: convert a model between our directory and another format: `hf` writes a
one-chain model as a Hugging Face Llama directory, `checkpoint` assembles the model directory of a
sharded training checkpoint. Each format is a small module exposing
`add_arguments(parser)` and `run(args)`, registered in FORMATS; modules are imported only when needed.
"""

from __future__ import annotations

import argparse
import importlib

# format -> (module, one-line help)
FORMATS: dict[str, tuple[str, str]] = {
    "hf": ("colm_runtime.commands.export_model",
           "a one-chain model as a Hugging Face LlamaForCausalLM directory (transformers, vLLM)"),
    "checkpoint": ("colm_runtime.training.cli_export",
                   "a sharded training checkpoint (colm train --parallel fsdp), e.g. RUN/checkpoint"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, (module, help_text) in FORMATS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(_format_module=module)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._format_module).run(args) or 0)
