"""The chain rule as a property: chains <= k never depend on chains > k."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.testing import random_model, small_config
from tests.model._helpers import IDS, SETTINGS


def _perturb_upper_chains(model, k: int) -> None:
    """Overwrite every parameter entry that belongs to chains > k with noise."""
    cfg, w = model.cfg, model.cfg.width(k)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("embed") or name.startswith("lm_head"):
                p[:, w:] = torch.randn_like(p[:, w:])
            elif name.endswith("norm.weight"):
                p[w:] = torch.randn_like(p[w:])
            else:  # ...chains.{j}.weight of a ChainLinear
                j = int(name.split(".chains.")[1].split(".")[0])
                if j >= k:
                    p.copy_(torch.randn_like(p))
    assert cfg.n_chains > k


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_upper_chain_weights_and_inputs_do_not_reach_lower_chains(setting):
    cfg = small_config(**setting)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    for k in range(1, cfg.n_chains):
        w = cfg.width(k)
        before = model(ids).detach()
        logits_before = model.logits(before[..., :w], k)
        perturbed = random_model(cfg)
        perturbed.load_state_dict(model.state_dict())
        _perturb_upper_chains(perturbed, k)
        after = perturbed(ids).detach()
        assert torch.equal(before[..., :w], after[..., :w]), f"chains <= {k} changed"
        assert not torch.equal(before[..., w:], after[..., w:])  # the perturbation did reach chains > k
        assert torch.equal(logits_before, perturbed.logits(after[..., :w], k))


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_k_chain_forward_is_the_prefix_of_the_full_forward(setting):
    cfg = small_config(**setting)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    full = model(ids)
    for k in range(1, cfg.n_chains + 1):
        torch.testing.assert_close(model(ids, k), full[..., : cfg.width(k)], rtol=0, atol=1e-6)


def test_scale_logits_match_each_scale():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    scales = model.scale_logits(model(ids))
    assert len(scales) == cfg.n_chains
    for k, lg in enumerate(scales, start=1):
        torch.testing.assert_close(lg.float(), model.logits(model(ids, k), k), rtol=0, atol=1e-5)


def test_chain_count_out_of_range_is_refused():
    model = random_model(small_config())
    with pytest.raises(ValueError, match="1..4"):
        model(torch.zeros(1, 3, dtype=torch.long), 5)
