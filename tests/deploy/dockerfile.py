"""A small reader for our Dockerfile and .dockerignore, enough to check them and replay the build.

It understands what our Dockerfile uses (ARG, FROM ... AS, ENV, RUN, COPY [--from], WORKDIR, USER,
EXPOSE, HEALTHCHECK, ENTRYPOINT/CMD in exec form) and refuses anything else, so a new instruction
makes the deploy tests fail loudly instead of being skipped silently.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

KNOWN = {"ARG", "FROM", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    """One instruction: keyword, its raw argument text (continuations joined) and its line."""

    keyword: str
    value: str
    line: int

    @property
    def exec_form(self) -> list[str]:
        """ENTRYPOINT/CMD/HEALTHCHECK CMD argument as a JSON array (exec form)."""
        text = self.value
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1]
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    """One FROM ... AS name stage with its instructions and ARGs declared inside it."""

    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction of that keyword in this stage, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        """The last instruction of that keyword (the one Docker keeps for CMD, USER, ...)."""
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    """Global ARGs (before the first FROM) and the stages."""

    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> Stage:
        """The stage the image runs (the last one)."""
        return self.stages[-1]


def instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining backslash continuations, dropping comments."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        keyword, _, value = buf.partition(" ")
        keyword = keyword.upper()
        if keyword not in KNOWN:
            raise ValueError(f"line {start}: {keyword} is not understood by tests/deploy/dockerfile.py")
        out.append(Instruction(keyword, value.strip(), start))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def parse(path: Path) -> Dockerfile:
    """Read a Dockerfile into global ARGs and stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(path.read_text()):
        if ins.keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", ins.value, re.IGNORECASE)
            assert m, ins
            stages.append(Stage(m.group(2) or str(len(stages)), m.group(1)))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may come before FROM: {ins}"
            name, _, default = ins.value.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's $VAR / ${VAR} substitution (unset variables become empty)."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_pairs(value: str) -> list[tuple[str, str]]:
    """`ENV K=V K2="a b"` -> [(K, V), (K2, "a b")] (values not yet expanded)."""
    pairs = []
    for token in shlex.split(value, posix=True):
        key, sep, val = token.partition("=")
        assert sep, f"ENV in the legacy `ENV key value` form is not supported: {value}"
        pairs.append((key, val))
    return pairs


def copy_args(ins: Instruction) -> tuple[str | None, list[str], str]:
    """COPY [--from=S] [--chown=U:G] SRC... DEST -> (from stage or None, sources, dest)."""
    tokens = shlex.split(ins.value)
    flags = [t for t in tokens if t.startswith("--")]
    unknown = [f for f in flags if not f.startswith(("--from=", "--chown="))]
    assert not unknown, f"line {ins.line}: COPY {unknown} is not understood by tests/deploy/dockerfile.py"
    paths = [t for t in tokens if not t.startswith("--")]
    source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return source_stage, paths[:-1], paths[-1]


def copy_owner(ins: Instruction) -> tuple[int, int] | None:
    """COPY --chown=UID:GID (numeric only: the replay has no passwd to look names up in)."""
    for token in shlex.split(ins.value):
        if token.startswith("--chown="):
            uid, _, gid = token.split("=", 1)[1].partition(":")
            return int(uid), int(gid or uid)
    return None


class DockerIgnore:
    """.dockerignore semantics: patterns in order, `!` re-includes, the last match decides."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            self.rules.append((negate, pattern.strip().strip("/")))

    def _matches(self, pattern: str, rel: str) -> bool:
        # A pattern matches the path or any of its parent directories (Docker's rule), and `**`
        # matches any number of directories.
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            candidate = "/".join(parts[:i])
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pattern[3:]):
                return True
        return False

    def excluded(self, rel: str) -> bool:
        """Whether the file `rel` (relative to the context root) stays out of the build context."""
        verdict = False
        for negate, pattern in self.rules:
            if self._matches(pattern, rel):
                verdict = not negate
        return verdict

    def context_files(self, root: Path, source: str) -> list[Path]:
        """The files under root/source that reach the build context."""
        base = root / source
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        return [p for p in files if not self.excluded(p.relative_to(root).as_posix())]
