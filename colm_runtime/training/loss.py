"""The multi-chain loss: one cross-entropy per scale k (the first k chains), weighted and summed.

All scales come from ONE full forward: by the chain rule the first k chains of the full model's
hidden states are the k-chain sub-model's, so scale k's logits are a partial sum of the LM head over
chains 1..k (CoLMModel.scale_logits). The forward runs only up to the largest trained scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colm_runtime.model import CoLMModel


def parse_weights(n_chains: int, scales: list[int] | None, weights: list[float] | None) -> dict[int, float]:
    """Scale -> weight. Default: every scale 1..n with weight 1 (the plain sum)."""
    scales = list(range(1, n_chains + 1)) if not scales else [int(s) for s in scales]
    for s in scales:
        if not 1 <= s <= n_chains:
            raise ValueError(f"loss scale {s} out of range: the model has chains 1..{n_chains}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"loss scales repeat: {scales}")
    if weights is None:
        weights = [1.0] * len(scales)
    if len(weights) != len(scales):
        raise ValueError(f"{len(weights)} loss weights for {len(scales)} loss scales {scales}")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"loss weights must be >= 0 with at least one positive, got {weights}")
    return dict(zip(scales, (float(w) for w in weights)))


def scale_losses(model: CoLMModel, windows: torch.Tensor, max_scale: int) -> list[torch.Tensor]:
    """Mean next-token cross-entropy of every scale 1..max_scale. windows: [B, S+1] -> [max_scale] list."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    hidden = model(inputs, chains=max_scale)  # [B, S, width(max_scale)]
    flat = targets.reshape(-1)
    return [F.cross_entropy(lg.reshape(flat.numel(), -1).float(), flat) for lg in model.scale_logits(hidden)]


class MultiChainLoss(nn.Module):
    """Wraps the model so that DistributedDataParallel sees the whole loss computation as one forward."""

    def __init__(self, model: CoLMModel, weights: dict[int, float]):
        super().__init__()
        self.model = model
        self.weights = dict(weights)
        self.max_scale = max(self.weights)

    def forward(self, windows: torch.Tensor, scales: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """windows: [B, S+1] -> (weighted sum of the per-scale losses, per-scale losses [scales] detached).
        scales (default max_scale): the largest scale computed; evaluation asks for every chain count
        through this forward because under FSDP only the root module's forward gathers the head."""
        losses = scale_losses(self.model, windows, scales or self.max_scale)
        total = sum(w * losses[s - 1] for s, w in self.weights.items() if s <= len(losses))
        return total, torch.stack([l.detach() for l in losses])
