"""`colm bench NAME ...`: dispatches to the benchmark module colm_runtime.bench.NAME, which exposes
add_arguments(parser) and run(args) -> int like every colm subcommand."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import colm_runtime.bench as _pkg

_NOT_BENCHMARKS = {"cli"}


def benchmarks() -> list[str]:
    """The benchmark modules present in colm_runtime/bench."""
    return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__)
                  if m.name not in _NOT_BENCHMARKS and not m.name.startswith("_"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in benchmarks():
        module = importlib.import_module(f"colm_runtime.bench.{name}")
        doc = (module.__doc__ or "").strip().splitlines()
        bp = sub.add_parser(name, help=doc[0] if doc else None, description=module.__doc__)
        module.add_arguments(bp)
        bp.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
