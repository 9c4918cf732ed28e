"""Resumable training state as safetensors + JSON (no pickle).

A checkpoint directory holds model.safetensors (fp32 weights), optimizer.safetensors (AdamW's step
count and moments per parameter, keyed by parameter name), rng.safetensors (the torch generator
states as uint8 tensors) and state.json (step, tokens seen, data position, the run's settings).
It is written to a temporary sibling and renamed, so an interrupted save never leaves half a state.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from colm_runtime.model import CoLMModel


class ResumeError(ValueError):
    """A checkpoint cannot be resumed; the message names the file."""


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands: optimiser steps done, tokens consumed, the next data window."""

    step: int
    tokens: int
    epoch: int
    offset: int


def _param_names(model: CoLMModel, opt: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def save_state(ckpt: Path, model: CoLMModel, opt: torch.optim.Optimizer, progress: TrainProgress,
               settings: dict[str, Any]) -> None:
    """Write the checkpoint directory atomically."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    tensors = {}
    for name, p in zip(_param_names(model, opt), (p for g in opt.param_groups for p in g["params"])):
        for key, val in opt.state.get(p, {}).items():
            tensors[f"{name}:{key}"] = val.detach().contiguous().cpu().reshape(val.shape)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng_tensors(), str(tmp / "rng.safetensors"))
    write_meta(tmp, progress, settings)
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch generator states (CPU, every CUDA device) as uint8 tensors."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def write_meta(ckpt: Path, progress: TrainProgress, settings: dict[str, Any]) -> None:
    """state.json: progress and the run's settings (read back by read_meta)."""
    (ckpt / "state.json").write_text(json.dumps({"progress": progress.__dict__, "settings": settings}, indent=2))


def read_meta(ckpt: Path) -> tuple[TrainProgress, dict[str, Any]]:
    """Progress and settings of a checkpoint, without touching tensors."""
    path = ckpt / "state.json"
    if not path.is_file():
        raise ResumeError(f"{path}: no training state to resume from")
    try:
        data = json.loads(path.read_text())
        return TrainProgress(**data["progress"]), data["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeError(f"{path}: corrupt training state ({e})") from None


def load_state(ckpt: Path, model: CoLMModel, opt: torch.optim.Optimizer) -> None:
    """Restore weights, optimiser moments and RNG states in place."""
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        moments = load_file(str(ckpt / "optimizer.safetensors"))
        rng = load_file(str(ckpt / "rng.safetensors"))
    except Exception as e:  # safetensors raises several types for missing/corrupt files
        raise ResumeError(f"{ckpt}: unreadable checkpoint ({e})") from None
    model_dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(model_dtype) for k, v in weights.items()})
    sd = opt.state_dict()
    state = {}
    for i, name in enumerate(_param_names(model, opt)):
        keys = {k.split(":", 1)[1]: v for k, v in moments.items() if k.split(":", 1)[0] == name}
        if keys:
            state[i] = keys
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    _restore_rng(rng)


def set_rng(ckpt: Path) -> None:
    """Restore the generator states saved in ckpt/rng.safetensors."""
    try:
        rng = load_file(str(ckpt / "rng.safetensors"))
    except Exception as e:  # safetensors raises several types for missing/corrupt files
        raise ResumeError(f"{ckpt}: unreadable checkpoint ({e})") from None
    _restore_rng(rng)


def _restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
