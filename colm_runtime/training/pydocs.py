"""The python-docs corpus: the reStructuredText sources of the Python 3.11 documentation, from
Debian's python3.11-doc package (PSF license), turned into plain text files.

Fetched with `apt-get download` (no root needed) and unpacked with `dpkg-deb -x` into a temporary
directory; the split into train/validation is a hash of each file's path, so it is the same on every
machine and does not depend on file-system order.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES = Path("usr/share/doc/python3.11/html/_sources")
COPYRIGHT = Path("usr/share/doc/python3.11-doc/copyright")


class DataError(RuntimeError):
    """The corpus cannot be fetched or prepared; the message says what to do."""


@dataclass(frozen=True)
class CorpusSummary:
    """What `prepare` wrote: file counts and character totals per split."""

    out: Path
    train_files: int
    validation_files: int
    train_chars: int
    validation_chars: int
    package_version: str


# reST roles such as :func:`json.dumps` or :ref:`label <target>` keep their visible text.
_ROLE = re.compile(r":[a-zA-Z0-9_:+-]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")
_DIRECTIVE_NOISE = re.compile(
    r"^\s*\.\. (index|_[^:]*|moduleauthor|sectionauthor|versionchanged|versionadded|highlight|"
    r"testsetup|testcleanup|toctree|module|currentmodule|audit-event|impl-detail|raw|include|"
    r"only|tabularcolumns|rst-class|c:[a-z]+|opcode)::?.*$")


def rest_to_text(rest: str) -> str:
    """Light clean-up of reST into readable text: roles and links keep their words, bookkeeping
    directives (index entries, labels, author lines) go; prose and code examples stay."""
    lines = [ln for ln in rest.splitlines() if not _DIRECTIVE_NOISE.match(ln)]
    text = "\n".join(lines)
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def is_validation(rel_path: str, percent: int) -> bool:
    """Deterministic split: a file is held out when its path's SHA-1 falls in the first `percent`%."""
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100 < percent


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` not found: the python-docs corpus needs a Debian/Ubuntu system "
                        f"with apt-get and dpkg-deb (or pass your own text files to `colm train --data`)") from None
    if res.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()[-500:]}\n"
                        f"hint: run `apt-get update` first if the package index is empty")
    return res.stdout


def fetch(workdir: Path) -> tuple[Path, str]:
    """Download and unpack the .deb; returns the unpacked root and the package version."""
    _run(["apt-get", "download", PACKAGE], workdir)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise DataError(f"apt-get download {PACKAGE} produced no .deb file in {workdir}")
    root = workdir / "root"
    _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], workdir)
    version = debs[-1].name.split("_")[1]
    return root, version


def prepare(out: Path, validation_percent: int = 5, source_root: Path | None = None) -> CorpusSummary:
    """Fetch (unless `source_root` holds an unpacked package) and write out/{train,validation}/*.txt,
    out/LICENSE (the package's copyright file) and out/SOURCE."""
    if not 0 < validation_percent < 100:
        raise DataError(f"validation percent must be in 1..99, got {validation_percent}")
    with tempfile.TemporaryDirectory(prefix="colm-pydocs-") as tmp:
        version = "local"
        if source_root is None:
            source_root, version = fetch(Path(tmp))
        src = source_root / SOURCES
        if not src.is_dir():
            raise DataError(f"{src}: no reST sources found in the unpacked package")
        counts = {"train": [0, 0], "validation": [0, 0]}
        for f in sorted(src.rglob("*.txt")):
            rel = f.relative_to(src).as_posix()
            text = rest_to_text(f.read_text(encoding="utf-8", errors="replace"))
            if len(text) < 200:
                continue  # stubs and index pages carry no prose
            split = "validation" if is_validation(rel, validation_percent) else "train"
            dest = out / split / (rel.removesuffix(".rst.txt").replace("/", "__") + ".txt")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")
            counts[split][0] += 1
            counts[split][1] += len(text)
        if (source_root / COPYRIGHT).is_file():
            shutil.copyfile(source_root / COPYRIGHT, out / "LICENSE")
    (out / "SOURCE").write_text(
        f"Debian package {PACKAGE} {version}: reST sources of the Python 3.11 documentation\n"
        f"({SOURCES}), converted to plain text by `colm data python-docs`.\n"
        f"License: Python Software Foundation License (see LICENSE).\n")
    return CorpusSummary(out, counts["train"][0], counts["validation"][0], counts["train"][1],
                         counts["validation"][1], version)
