"""`colm data python-docs --out DIR`: fetch and prepare the default training corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from colm_runtime.cli import CLIError

CORPORA = ("python-docs",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", choices=CORPORA, help="python-docs: Python 3.11 docs from Debian (PSF license)")
    p.add_argument("--out", required=True, type=Path, help="output directory (train/ and validation/ inside)")
    p.add_argument("--validation-percent", type=int, default=5, help="share of files held out (default 5)")
    p.add_argument("--from-unpacked", type=Path, default=None,
                   help="use an already unpacked python3.11-doc package root instead of downloading")


def run(args: argparse.Namespace) -> int:
    from colm_runtime.training.pydocs import DataError, prepare

    try:
        s = prepare(args.out, args.validation_percent, args.from_unpacked)
    except DataError as e:
        raise CLIError(str(e)) from None
    print(f"python-docs {s.package_version}: {s.train_files} train files ({s.train_chars / 1e6:.1f} M chars), "
          f"{s.validation_files} validation files ({s.validation_chars / 1e6:.2f} M chars) -> {s.out}")
    return 0
