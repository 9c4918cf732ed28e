"""The checkpoint format: a model directory with config.json, model.safetensors and tokenizer.json.

Loading checks every tensor's presence and shape against the config and names the offending tensor;
nothing is unpickled (safetensors only). docs/checkpoint-format.md describes every tensor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from colm_runtime.config import ConfigError, ModelConfig
from colm_runtime.model import CoLMModel

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
# Beside tokenizer.json: end-of-sequence ids, BOS and the chat template (docs/checkpoint-format.md).
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


class CheckpointError(ValueError):
    """A model directory is missing, corrupt or does not match its config."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint and its shape, derived from the config alone."""
    with torch.device("meta"):  # no memory, no init: a 135M model costs seconds to build on the CPU
        model = CoLMModel(cfg)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def save_model(model: CoLMModel, out_dir: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write a model directory. Weights are stored in the model's dtype, contiguous. The tokenizer's
    side files (eos ids, BOS, chat template) beside `tokenizer_file` come along with it."""
    out = save_state(model.cfg, model.state_dict(), out_dir)
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (out / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_file, out / TOKENIZER)
        copy_tokenizer_files(Path(tokenizer_file).parent, out)
    return out


def save_state(cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write config.json and model.safetensors (tensors contiguous, in their own dtype)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "model_type": "colm"})
    (out / WEIGHTS).chmod(0o644)  # safetensors writes 0600; a container's non-root user must read it
    return out


def load_config(model_dir: str | Path) -> ModelConfig:
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d}: missing {CONFIG}")
    try:
        return ModelConfig.load(d / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None


def load_state(model_dir: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Read and check the weights: every expected tensor present with its exact shape, no extras."""
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: missing {WEIGHTS}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    want = expected_shapes(cfg)
    for name, shape in want.items():
        if name not in state:
            raise CheckpointError(f"{path}: missing tensor '{name}' (expected shape {list(shape)})")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(state[name].shape)}, "
                                  f"config expects {list(shape)}")
        if not state[name].is_floating_point():
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {state[name].dtype}, expected floating point")
    extra = sorted(set(state) - set(want))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor(s) {extra[:5]} for this config")
    return state


def load_model(model_dir: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> CoLMModel:
    """Load a checked model in eval mode; dtype defaults to the checkpoint's."""
    cfg = load_config(model_dir)
    state = load_state(model_dir, cfg)
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):
        model = CoLMModel(cfg)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval().column_major_head()  # its layout depends on both


def extract_state(model: CoLMModel, chains: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The first `chains` chains as a standalone checkpoint: later chains' blocks are dropped, and
    vectors and matrices over the hidden width keep their first width(chains) columns."""
    cfg = model.cfg
    sub = cfg.truncated(chains)
    want = expected_shapes(sub)
    state = {}
    for name, t in model.state_dict().items():
        if name not in want:
            continue  # a block of a dropped chain
        shape = want[name]
        state[name] = t[tuple(slice(0, n) for n in shape)].clone()
    return sub, state


def extract(model_dir: str | Path, chains: int, out_dir: str | Path) -> Path:
    """`colm extract`: write the first `chains` chains of a model directory as its own checkpoint."""
    model = load_model(model_dir)
    try:
        model.cfg.check_chains(chains)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    sub, state = extract_state(model, chains)
    sub_model = CoLMModel(sub)
    sub_model.load_state_dict(state)
    tok = Path(model_dir) / TOKENIZER
    return save_model(sub_model, out_dir, tok if tok.is_file() else None)


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> None:
    """Copy the tokenizer's side files (eos ids, BOS, chat template) that exist in src_dir."""
    for name in TOKENIZER_SIDE_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(out_dir) / name)
