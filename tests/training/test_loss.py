"""The multi-chain loss and the optimiser: a few steps lower the loss at every scale."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.model import CoLMModel
from colm_runtime.testing import small_config
from colm_runtime.training.loss import MultiChainLoss, parse_weights, scale_losses
from colm_runtime.training.optim import build_optimizer, lr_at


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_few_steps_lower_every_scale(kv_sharing):
    cfg = small_config(chains=(2, 2, 2), kv_sharing=kv_sharing, vocab_size=64, n_layers=1)
    model = CoLMModel(cfg).init_weights(0)
    loss_mod = MultiChainLoss(model, parse_weights(3, None, None))
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))
    windows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    _, before = loss_mod(windows)
    for _ in range(8):
        loss, _ = loss_mod(windows)
        loss.backward()
        opt.step()
        opt.zero_grad()
    _, after = loss_mod(windows)
    assert (after < before).all(), (before, after)


def test_scale_losses_match_submodel_forward():
    """One full forward gives each scale's loss exactly as a forward at that chain count would."""
    cfg = small_config(chains=(2, 2, 2), vocab_size=64, n_layers=2)
    model = CoLMModel(cfg).init_weights(0)
    w = torch.randint(0, 64, (2, 9))
    losses = scale_losses(model, w, 3)
    for k in (1, 2, 3):
        logits = model.logits(model(w[:, :-1], chains=k), k)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), w[:, 1:].reshape(-1))
        torch.testing.assert_close(losses[k - 1], ref, rtol=1e-5, atol=1e-5)


def test_weights_and_scales_are_checked():
    assert parse_weights(4, [4], None) == {4: 1.0}
    assert parse_weights(2, None, [0.5, 1.0]) == {1: 0.5, 2: 1.0}
    for scales, weights in (([5], None), ([0], None), ([1, 1], None), ([1, 2], [1.0]), ([1], [0.0])):
        with pytest.raises(ValueError):
            parse_weights(4, scales, weights)


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(0.1)
