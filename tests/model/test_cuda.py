"""The same code on CUDA in bf16 and fp16 (skipped without a GPU; run by benchmarks/gpu.sh when lent)."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.testing import random_model, small_config
from tests.model._helpers import PagedRunner, full_logits, rand_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("air", [False, True])
def test_cuda_paged_decode_tracks_cpu_fp32(dtype, air):
    cfg = small_config(kv_sharing=air)
    cpu = random_model(cfg)
    gpu = random_model(cfg).to("cuda", dtype)
    ids = rand_ids(cfg, 24, seed=5)
    for k in (1, cfg.n_chains):
        ref = full_logits(cpu, ids, k)
        run = PagedRunner(gpu)
        got = run.step([(0, ids[:16], 0, k)], all_logits=True)[0].cpu()
        for t in range(16, 24):
            got = torch.cat([got, run.step([(0, ids[t : t + 1], t, k)])[0].cpu()[None]])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref[:24], rtol=0, atol=0.15 * ref.abs().max().item())
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
