"""The `colm` command. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "generate": ("colm_runtime.commands.generate", "generate text from the shell at a chosen chain count"),
    "extract": ("colm_runtime.commands.extract", "write the first K chains as a standalone checkpoint"),
    "import": ("colm_runtime.commands.import_model", "import a Llama checkpoint (Hugging Face dir or GGUF) as one chain"),
    "train": ("colm_runtime.training.cli_train", "train a CoLM (or its dense baseline) on local text"),
    "expand": ("colm_runtime.training.cli_expand", "add a chain to a trained model (progressive scaling)"),
    "eval": ("colm_runtime.training.cli_eval", "perplexity and decode speed per chain count"),
    "data": ("colm_runtime.training.cli_data", "fetch and prepare a training corpus"),
    "export": ("colm_runtime.commands.export", "convert a model: a one-chain model to Hugging Face (hf), a sharded training checkpoint to a model directory (checkpoint)"),
    "bench": ("colm_runtime.bench.cli", "benchmarks (model, engine, ...); prints JSON with --json"),
}


class CLIError(Exception):
    """A user mistake on the command line: printed as `colm: error: ...`, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colm", description="CoLM Serve: elastic Chain-of-Model serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily (see main) so `colm --help` imports no torch.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # First pass: find the command, then let its module declare its arguments and parse again.
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        p = argparse.ArgumentParser(prog=f"colm {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(p)
        args = p.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except CLIError as e:
            p.error(str(e))  # exits 2
        except KeyboardInterrupt:
            return 130
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    # Run the imported module's main: as __main__ this file is a second copy whose CLIError class
    # is not the one the subcommand modules raise.
    from colm_runtime.cli import main as _main

    sys.exit(_main())
