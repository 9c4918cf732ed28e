"""AdamW with warm-up and cosine decay, and chain freezing for expansion and chain tuning.

Freezing chains < K keeps them bit-identical: their Chain-of-Linear blocks are excluded from the
optimiser (requires_grad=False), and in tensors shared by all chains (embedding, LM head, norm
weights) the columns of frozen chains get a zero gradient. AdamW's moments of those columns then
stay exactly zero, so their update is exactly zero; weight decay is applied only to Chain-of-Linear
matrices, never to the embedding, head or norms, so no decay touches frozen columns either.
"""

from __future__ import annotations

import math
import re

import torch
from torch.distributed.tensor import DTensor

from colm_runtime.model import CoLMModel

_CHAIN = re.compile(r"\.chains\.(\d+)\.")


def chain_of(name: str) -> int | None:
    """The chain a Chain-of-Linear block parameter belongs to (None for shared tensors)."""
    m = _CHAIN.search(name)
    return int(m.group(1)) if m else None


def freeze_chains(model: CoLMModel, k: int) -> None:
    """Exclude the blocks of chains < k from training (see module docstring)."""
    assert 0 <= k <= model.cfg.n_chains
    for name, p in model.named_parameters():
        c = chain_of(name)
        if c is not None and c < k:
            p.requires_grad_(False)


def mask_frozen_grads(model: CoLMModel, k: int) -> None:
    """Zero the gradient of frozen chains' columns in shared tensors (after backward, before clipping)."""
    if k <= 0:
        return
    width = model.cfg.width(k)
    for name, p in model.named_parameters():
        if p.grad is not None and chain_of(name) is None:
            assert p.shape[-1] == model.cfg.dim, f"{name}: a shared tensor is expected to span the width"
            g, offset = local_view(p.grad)
            if g.ndim == 2:
                g[:, :width] = 0  # embed/lm_head: [vocab, dim]; an FSDP shard is a range of rows
            else:
                g[: max(0, width - offset)] = 0  # norms: [dim]; an FSDP shard is a range of columns


def local_view(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part of a gradient, its offset along dim 0): the whole tensor at offset 0, or an
    FSDP2 shard (a DTensor sharded on dim 0 in torch.chunk's pieces)."""
    if not isinstance(grad, DTensor):
        return grad, 0
    chunk = -(-grad.shape[0] // grad.device_mesh.size())
    return grad.to_local(), chunk * grad.device_mesh.get_local_rank()


def build_optimizer(model: CoLMModel, lr: float, weight_decay: float, betas: tuple[float, float],
                    fused: bool = False) -> torch.optim.AdamW:
    """AdamW; decay on Chain-of-Linear matrices only. Parameter order is the model's (stable)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if chain_of(name) is not None and p.ndim == 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=not fused, fused=fused or None)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio * base_lr at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
