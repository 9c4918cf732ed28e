"""Replay the Dockerfile without Docker: its build stage's COPY / ENV / RUN into a directory that
stands in for the image's root, then its final stage's COPY / ENV / WORKDIR / USER, ready to start
ENTRYPOINT + CMD and run HEALTHCHECK exactly as the container would.

What differs from `docker build` and `docker run`, and why (each is a property of the machine, not
of the image):
- Absolute paths of the image (/opt, /src) live under the stand-in root.
- The base image's `python` is this machine's Python 3.11 (the image pins python:3.11-slim).
- TORCH_INDEX_URL points at this machine's package index instead of download.pytorch.org (no
  internet here; pip's local wheel directory supplies the same CPU build of torch), and pip keeps
  its cache (PIP_NO_CACHE_DIR only keeps the image small).
- The server binds 127.0.0.1 on a free port (tests bind loopback only) instead of 0.0.0.0:8000.
- RUN steps of the final stage (creating the user and /models, installing Debian's gcc for the C
  kernel) need root and are not replayed; this machine has gcc already. The server runs as the
  Dockerfile's USER uid when the test runs as root, as the caller otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .dockerfile import Dockerfile, DockerIgnore, Stage, copy_args, copy_owner, env_pairs, expand

# The base image's PATH (python:3.11-slim), which `ENV PATH=/opt/venv/bin:$PATH` extends.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# RUN steps of the final stage that the replay may skip (user creation and an empty directory; Debian
# packages, which this machine has).
SKIPPABLE_RUNTIME_RUN = re.compile(r"(groupadd [^&]+&& )?useradd [^&]+( && mkdir -p [/\w]+)?|apt-get update && "
                                   r"apt-get install -y --no-install-recommends [^&]+ && rm -rf /var/lib/apt/lists/\*")


@dataclass
class Image:
    """The replayed image: its root, the runtime environment and what the container would run."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    user: tuple[int, int] | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def popen_user(self) -> dict:
        """subprocess keywords that run as the image's USER (only possible as root)."""
        if self.user is None or os.geteuid() != 0:
            return {}
        return {"user": self.user[0], "group": self.user[1], "extra_groups": []}


def base_python() -> str:
    """A Python 3.11 interpreter that any user may run (a non-root server must exec it)."""
    for candidate in ("/usr/local/bin/python3.11", "/usr/bin/python3.11"):
        if os.access(candidate, os.X_OK) and _world_reachable(Path(candidate)):
            return candidate
    return sys._base_executable


def _world_reachable(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in path.resolve().parents)


class Replay:
    """Walks the Dockerfile's stages into `root`, building from the `context` directory."""

    def __init__(self, df: Dockerfile, context: Path, root: Path, arg_overrides: dict[str, str]):
        self.df, self.context, self.root = df, context, root
        root.mkdir(parents=True, exist_ok=True)
        self.ignore = DockerIgnore((context / ".dockerignore").read_text())
        self.overrides = arg_overrides
        tops = {self._top(i.value) for s in df.stages for i in s.all("WORKDIR")}
        tops |= {self._top(copy_args(i)[2]) for s in df.stages for i in s.all("COPY")}
        tops.discard(None)
        self._abs = re.compile(r"(?<![\w/.:-])(" + "|".join(map(re.escape, sorted(tops))) + r")(?=/|\s|$|\")")
        self.image = Image(root)

    @staticmethod
    def _top(path: str) -> str | None:
        return "/" + path.strip("/").split("/")[0] if path.startswith("/") else None

    def rebase(self, text: str) -> str:
        """/opt/venv -> ROOT/opt/venv (only the image's own top-level directories)."""
        return self._abs.sub(lambda m: str(self.root) + m.group(1), text)

    def build_stage(self, stage: Stage, shim: Path) -> None:
        """Run the build stage as `docker build` would (RUN via /bin/sh -c, as root)."""
        env = {"PATH": f"{shim}:{BASE_PATH}", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
        env |= {k: v for k, v in os.environ.items() if k.startswith("PIP_")}  # this machine's package access
        workdir = self.root
        for ins in stage.instructions:
            if ins.keyword == "ARG":
                name, _, default = ins.value.partition("=")
                env[name] = self.overrides.get(name, default)
            elif ins.keyword == "ENV":
                for key, value in env_pairs(ins.value):
                    env[key] = self.rebase(expand(value, env))
                env.pop("PIP_NO_CACHE_DIR", None)
            elif ins.keyword == "WORKDIR":
                workdir = Path(self.rebase(ins.value))
                workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                self.copy(ins, workdir)
            elif ins.keyword == "RUN":
                command = self.rebase(ins.value)
                self.image.log.append(f"RUN {command}")
                out = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True,
                                     text=True, timeout=600)
                assert out.returncode == 0, \
                    f"Dockerfile line {ins.line} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
            else:
                raise AssertionError(f"build stage: {ins.keyword} is not replayed (line {ins.line})")

    def final_stage(self, stage: Stage) -> Image:
        """Lay out the final stage and collect how the container runs."""
        img = self.image
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
        for ins in stage.instructions:
            if ins.keyword == "RUN":
                assert SKIPPABLE_RUNTIME_RUN.fullmatch(ins.value), f"line {ins.line}: teach image_replay this RUN"
            elif ins.keyword == "COPY":
                self.copy(ins, img.workdir or self.root)
            elif ins.keyword == "ENV":
                for key, value in env_pairs(ins.value):
                    env[key] = self.rebase(expand(value, env))
            elif ins.keyword == "WORKDIR":
                img.workdir = Path(self.rebase(ins.value))
                img.workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "USER":
                uid, _, gid = ins.value.partition(":")
                img.user = (int(uid), int(gid or uid))
            elif ins.keyword in ("ENTRYPOINT", "CMD", "HEALTHCHECK"):
                setattr(img, ins.keyword.lower(), ins.exec_form)
            elif ins.keyword != "EXPOSE":
                raise AssertionError(f"final stage: {ins.keyword} is not replayed (line {ins.line})")
        # Docker sets HOME from the user's passwd entry: the image creates none (--no-create-home).
        img.env = env | {"HOME": str(self.root / "home" / "colm")}
        return img

    def copy(self, ins, workdir: Path) -> None:
        """COPY from the build context (honouring .dockerignore) or from an earlier stage."""
        source_stage, sources, dest = copy_args(ins)
        target = Path(self.rebase(dest)) if dest.startswith("/") else workdir / dest
        for src in sources:
            if source_stage is not None:  # every stage shares the one stand-in root
                origin = Path(self.rebase(src))
                if origin.resolve() != target.resolve():
                    shutil.copytree(origin, target, symlinks=True, dirs_exist_ok=True)
                continue
            files = self.ignore.context_files(self.context, src)
            assert files, f"Dockerfile line {ins.line}: nothing to COPY from {src}"
            base = self.context / src
            owner = copy_owner(ins)
            for f in files:
                rel = f.name if base.is_file() else f.relative_to(base).as_posix()
                out = (target / rel) if (dest.endswith("/") or base.is_dir() or len(sources) > 1) else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)  # keeps the mode bits, as COPY does
                if owner is not None and os.geteuid() == 0:
                    for p in (out, *[d for d in out.parents if d.is_relative_to(target)]):
                        os.chown(p, *owner)


def replay(df: Dockerfile, context: Path, root: Path, arg_overrides: dict[str, str]) -> Image:
    """Build every stage of `df` into `root` and return the final image's run description."""
    r = Replay(df, context, root, arg_overrides)
    shim = root.parent / (root.name + "-shim")
    shim.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (shim / name).unlink(missing_ok=True)
        (shim / name).symlink_to(base_python())
    for stage in df.stages[:-1]:
        r.build_stage(stage, shim)
    return r.final_stage(df.final)
