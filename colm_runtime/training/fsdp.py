"""FSDP2 for `colm train --parallel fsdp` under torchrun: every rank holds 1/world of the weights,
gradients and AdamW moments (torch.distributed.fsdp.fully_shard), and checkpoints are sharded
(torch.distributed.checkpoint, DCP).

Units: one per transformer block, plus the root, which is the multi-chain loss module and so holds the
embedding, the final norm and the LM head (tied or not). The head must sit in the root: the loss reads
its columns chain by chain after the model's forward (CoLMModel.scale_logits), inside the root's forward.
On CUDA the mixed-precision policy computes in bf16 and reduces gradients in fp32; on CPU (gloo)
everything stays fp32, which is what makes the 2-process run equal the 1-process run to 1e-5.

A sharded checkpoint directory holds dcp/ (each rank's shards of the weights and AdamW's moments and
step, one safetensors file per rank, written and read by DCP's HuggingFace storage: the offsets of
each shard are JSON in the file's metadata, so no pickle is written or read, unlike DCP's default
`.metadata`), config.json and tokenizer.json (so that `colm export checkpoint` needs nothing else),
rng.safetensors and state.json as in state.py. AdamW's param_groups are not saved: the run's
settings rebuild them and the learning rate is set every step.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from colm_runtime.checkpoint import CONFIG, TOKENIZER, load_config
from colm_runtime.model import CoLMModel
from colm_runtime.training.distributed import DistEnv, barrier
from colm_runtime.training.loss import MultiChainLoss
from colm_runtime.training.state import ResumeError, TrainProgress, rng_tensors, set_rng, write_meta

DCP_DIR = "dcp"


def shard(loss: MultiChainLoss, env: DistEnv) -> MultiChainLoss:
    """Apply fully_shard per block, then to the loss module as the root; returns the same module."""
    mesh = init_device_mesh(env.device.type, (env.world,))
    if env.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # fp32 throughout
    model = loss.model
    for mod in (model.embed, model.lm_head):
        # FSDP shards contiguous tensors only: undo CoLMModel.column_major_head (a decode-speed layout).
        if mod is not None and not mod.weight.is_contiguous():
            mod.weight = nn.Parameter(mod.weight.detach().contiguous(), requires_grad=mod.weight.requires_grad)
    for blk in model.layers:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(loss, mesh=mesh, mp_policy=mp)
    return loss


def save_sharded(ckpt: Path, model: CoLMModel, opt: torch.optim.Optimizer, progress: TrainProgress,
                 settings: dict[str, Any], tokenizer_file: Path, env: DistEnv) -> None:
    """Every rank writes its shards; rank 0 writes the rest and renames the directory into place."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd["state"]},
             storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True))
    if env.is_main:
        model.cfg.save(tmp / CONFIG)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        write_meta(tmp, progress, settings)
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
    barrier(env)


def load_sharded(ckpt: Path, model: CoLMModel, opt: torch.optim.Optimizer) -> None:
    """Restore this rank's shards of the weights and moments, and the RNG state, in place."""
    _check_sharded(ckpt)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd["state"]}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(ckpt / DCP_DIR)))
    set_state_dict(model, opt, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": osd["param_groups"]})
    set_rng(ckpt)


def load_full_model(ckpt: Path) -> CoLMModel:
    """The whole model of a sharded checkpoint, in one process, on CPU, fp32 (no process group)."""
    _check_sharded(ckpt)
    model = CoLMModel(load_config(ckpt))
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(ckpt / DCP_DIR)), no_dist=True)
        model.load_state_dict(state["model"])
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException; safetensors raises several types
        raise ResumeError(f"{ckpt}: unreadable sharded checkpoint ({_first_line(e)})") from None
    return model


def _first_line(e: BaseException) -> str:
    """DCP wraps the cause in every rank's traceback: keep the cause's message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _check_sharded(ckpt: Path) -> None:
    if not any((ckpt / DCP_DIR).glob("*.safetensors")):
        raise ResumeError(f"{ckpt}: not a sharded (FSDP) training checkpoint (no {DCP_DIR}/*.safetensors)")
