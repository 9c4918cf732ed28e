"""Process-group setup for `torchrun`: one code path for one CPU process, many CPU processes (gloo)
and many GPUs or machines (nccl). Nothing changes in the training code."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run. world == 1 means no process group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", group: bool = False) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the group if world > 1
    (or always with `group`: FSDP needs one even for a single process; then torchrun is required)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if group and "MASTER_ADDR" not in os.environ:
        raise ValueError("--parallel fsdp runs under torchrun (e.g. torchrun --standalone --nproc-per-node 2 "
                         "-m colm_runtime.cli train ...)")
    if (world > 1 or group) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, dev)


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def mean(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (for logging only)."""
    if env.world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= env.world
    return t


def teardown(env: DistEnv) -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while another still uses them
        dist.destroy_process_group()
