"""Cached decoding over the paged cache equals the full-sequence forward; mixed batches equal rows alone."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.model import CoLMModel, ForwardBatch, SeqSpec, cpu_kernels
from colm_runtime.testing import random_model, small_config
from tests.model._helpers import IDS, SETTINGS, PagedRunner, full_logits, rand_ids

TOL = dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_incremental_decode_equals_full_forward(setting):
    cfg = small_config(**setting)
    model = random_model(cfg)
    ids = rand_ids(cfg, 30, seed=1)
    for k in range(1, cfg.n_chains + 1):
        ref = full_logits(model, ids, k)
        run = PagedRunner(model, block_size=4)
        # prefill in two chunks (the second attends to cached past), then one token at a time
        run.step([(0, ids[:7], 0, k)])
        got = run.step([(0, ids[7:13], 7, k)], all_logits=True)[0]
        torch.testing.assert_close(got, ref[7:13], **TOL)
        for t in range(13, len(ids)):
            torch.testing.assert_close(run.step([(0, ids[t : t + 1], t, k)])[0], ref[t], **TOL)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_mixed_chain_batch_equals_each_row_alone(setting):
    cfg = small_config(**setting)
    model = random_model(cfg)
    n = cfg.n_chains
    # sequences of every chain count, in an order that is not sorted by chains
    seqs = [(i, rand_ids(cfg, 5 + 3 * i, seed=10 + i), 1 + (i * 7) % n) for i in range(2 * n + 1)]
    batched = PagedRunner(model)
    alone = {sid: PagedRunner(model, seed=sid + 1) for sid, _, _ in seqs}
    # step 1: every prompt prefilled together; steps 2..: a decode token each, plus a late prefill
    got = batched.step([(sid, ids[:-3], 0, k) for sid, ids, k in seqs])
    for (sid, ids, k), g in zip(seqs, got):
        torch.testing.assert_close(g, alone[sid].step([(sid, ids[:-3], 0, k)])[0], **TOL)
    late = rand_ids(cfg, 9, seed=99)
    late_alone = PagedRunner(model, seed=99)
    for t in (3, 2, 1):
        items = [(sid, ids[-t : len(ids) - t + 1], len(ids) - t, k) for sid, ids, k in seqs]
        if t == 2:
            items.insert(1, (100, late, 0, 1 + n // 2))
        got = batched.step(items)
        for (sid, toks, ctx, k), g in zip(items, got):
            runner = late_alone if sid == 100 else alone[sid]
            torch.testing.assert_close(g, runner.step([(sid, toks, ctx, k)])[0], **TOL)
    # and every row equals the full forward at its chain count
    for sid, ids, k in seqs:
        torch.testing.assert_close(alone[sid].step([(sid, ids[-1:], len(ids) - 1, k)])[0],
                                   full_logits(model, ids, k)[-1], **TOL)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
@pytest.mark.parametrize("pattern", ["all-full", "mixed-gaps", "all-one", "prefill-above-decodes"])
def test_decode_steps_of_every_chain_pattern_equal_each_row_alone(setting, pattern):
    """Decode rows attend as (sequence, chain) pairs: every row at the batch's chain count (the pairs are
    the queries' own order), counts with gaps, one chain only, and a prefill wider than every decode."""
    cfg = small_config(**setting)
    model = random_model(cfg)
    n = cfg.n_chains
    chains = {"all-full": [n, n, n], "mixed-gaps": [n, 1, n, 1 + n // 2, 1], "all-one": [1, 1, 1],
              "prefill-above-decodes": [1, 1 + (n - 1) // 2, 1]}[pattern]
    seqs = [(i, rand_ids(cfg, 6 + 5 * i, seed=20 + i), k) for i, k in enumerate(chains)]
    batched = PagedRunner(model, seed=7)
    alone = {sid: PagedRunner(model, seed=sid + 3) for sid, _, _ in seqs}
    for sid, ids, k in seqs:  # prompts: each alone, in both runners
        batched.step([(sid, ids[:-2], 0, k)])
        alone[sid].step([(sid, ids[:-2], 0, k)])
    for t in (2, 1):
        items = [(sid, ids[-t : len(ids) - t + 1], len(ids) - t, k) for sid, ids, k in seqs]
        if pattern == "prefill-above-decodes" and t == 1:
            items.append((50, rand_ids(cfg, 7, seed=50), 0, n))
            alone[50] = PagedRunner(model, seed=50)
        got = batched.step(items)
        for (sid, toks, ctx, k), g in zip(items, got):
            torch.testing.assert_close(g, alone[sid].step([(sid, toks, ctx, k)])[0], **TOL)


def test_rows_pay_only_for_their_chains(monkeypatch):
    """A chain's blocks run on exactly the rows that use it: every matmul on a chain block's weight is
    recorded (F.linear in training, torch.mm / addmm into the output in inference, or our fp32 kernel)."""
    from torch.overrides import TorchFunctionMode

    cfg = small_config()
    model = random_model(cfg)
    blocks = {"down": model.layers[0].ffn.down, "qkv": model.layers[1].attn.qkv}
    weights = {lin.weight.data_ptr(): (name, j) for name, m in blocks.items() for j, lin in enumerate(m.chains)}
    seen: dict[tuple[str, int], list[int]] = {w: [] for w in weights.values()}
    matmuls = {torch.nn.functional.linear, torch.mm, torch.addmm, torch.Tensor.addmm_}

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                x, w = (args[1], args[2]) if func in (torch.addmm, torch.Tensor.addmm_) else args[:2]
                if w.data_ptr() in weights:
                    seen[weights[w.data_ptr()]].append(x.shape[0])
            return func(*args, **(kwargs or {}))

    kernel = cpu_kernels.gemm_f32

    def recorded_kernel(x, w, *args, **kwargs):
        if w.data_ptr() in weights:
            seen[weights[w.data_ptr()]].append(x.shape[0])
        return kernel(x, w, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "gemm_f32", recorded_kernel)
    # The Python loop of forward_step; the fused C path runs the same products on the same rows
    # (tests/model/test_layers_step.py: bit-identical, and blind to chains its rows do not use).
    monkeypatch.setattr(CoLMModel, "_layers_in_c", lambda *a: False)
    run = PagedRunner(model)
    with Record():
        run.step([(0, [1, 2, 3], 0, 1), (1, [4, 5], 0, 4), (2, [6], 0, 2)])
    for name in blocks:
        assert {j: seen[name, j] for j in range(cfg.n_chains)} == {0: [6], 1: [3], 2: [2], 3: [2]}, name


@pytest.mark.parametrize("air", [False, True])
def test_bf16_on_cpu_tracks_fp32(air):
    cfg = small_config(kv_sharing=air)
    m32 = random_model(cfg)
    m16 = random_model(cfg, dtype=torch.bfloat16)
    ids = rand_ids(cfg, 20, seed=4)
    ref = full_logits(m32, ids, cfg.n_chains)
    run = PagedRunner(m16)
    got = run.step([(0, ids[:12], 0, cfg.n_chains)], all_logits=True)[0]
    got = torch.cat([got] + [run.step([(0, ids[t : t + 1], t, cfg.n_chains)])[0][None] for t in range(12, 20)])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=0.1 * ref.abs().max().item())


def test_bf16_mixed_chain_batch_tracks_fp32():
    """bf16 on the CPU with every chain count in one batch (bucketed, padded matmuls; the one-product mixed
    LM head; one-row products when a step has a single row): each sequence's logits track the fp32 full
    forward at its own chain count, prefill then decode."""
    cfg = small_config()
    m32, m16 = random_model(cfg), random_model(cfg, dtype=torch.bfloat16)
    assert m16.warm_kernels(64, 8) > 0 and m32.warm_kernels(64, 8) == 0
    seqs = {k: rand_ids(cfg, 14, seed=10 + k) for k in range(1, cfg.n_chains + 1)}
    run = PagedRunner(m16)
    got = {k: [v] for k, v in zip(seqs, run.step([(k, ids[:11], 0, k) for k, ids in seqs.items()]))}
    for t in range(11, 14):
        for k, v in zip(seqs, run.step([(k, ids[t : t + 1], t, k) for k, ids in seqs.items()])):
            got[k].append(v)
    alone = run.step([(1, [3], 14, 1)])[0]  # a one-row step: the matrix-vector path
    for k, ids in seqs.items():
        ref = full_logits(m32, ids, k)[10:]
        tol = 0.1 * ref.abs().max().item()
        torch.testing.assert_close(torch.stack(got[k]), ref, rtol=0, atol=tol)
    ref1 = full_logits(m32, seqs[1] + [3], 1)[-1]
    torch.testing.assert_close(alone, ref1, rtol=0, atol=0.1 * ref1.abs().max().item())


@pytest.mark.parametrize("setting", SETTINGS[:3], ids=IDS[:3])
def test_upper_chains_computed_over_a_prefix_held_in_the_lower_pools(setting):
    """Prefix caching's partial hit: a prompt cached at 1 chain (pool 0) is computed at n chains with
    kv_from = its length in pool 0. The logits equal the full forward, pool 0's blocks are not rewritten
    (bitwise), and the rows' pool-0 writes land in the cache's sink block instead."""
    cfg = small_config(**setting)
    model = random_model(cfg)
    n, ids = cfg.n_chains, rand_ids(cfg, 14, seed=3)
    run = PagedRunner(model, block_size=4)
    run.step([(0, ids[:12], 0, 1)])  # pool 0 holds positions 0..11
    held = [b for b in run.tables[0][0][:3]]
    before = run.cache.k[0][:, held].clone(), run.cache.v[0][:, held].clone()
    spec = SeqSpec(ids, 0, n, run.table(0, 14), num_logits=14, kv_from=(12,) + (0,) * (cfg.n_kv_pools - 1))
    batch = ForwardBatch.build(cfg, [spec], 4, "cpu", run.cache.sink_slots)
    got = model.forward_step(batch, run.cache)  # [14, V]
    torch.testing.assert_close(got, full_logits(model, ids, n), **TOL)
    assert torch.equal(run.cache.k[0][:, held], before[0]) and torch.equal(run.cache.v[0][:, held], before[1])
    sink = run.cache.k[0][:, run.cache.num_blocks[0]]
    assert sink.abs().sum() > 0, "the held rows' writes went to the sink"


@pytest.mark.parametrize("setting", [dict(chains=(2, 2, 2, 2)), dict(chains=(3, 3, 3), head_dim=64),
                                     dict(chains=(4, 4), kv_per_chain=2)], ids=["colm-2222", "colm-333-hd64", "gqa2"])
def test_prefill_tokens_as_kernel_pairs_equal_the_sdpa_groups(setting, monkeypatch):
    """On the CPU kernel a short prefill chunk (attention.PAIRS_MAX_WORK) attends as one-query pairs
    (each token its own causal length), with the step's decode rows in the same call; past it, each
    prefill is a group gathered for SDPA. Both give the same logits: a chunk over a cached past next to
    decode rows at every chain count, and a fresh prompt."""
    from colm_runtime.model import attention

    cfg = small_config(**setting)
    model = random_model(cfg)
    n = cfg.n_chains
    if not attention.kernel_takes(cfg, PagedRunner(model).cache):
        pytest.skip("no CPU kernel for these shapes")
    seqs = [(i, rand_ids(cfg, 12 + i, seed=20 + i), 1 + i % n) for i in range(n + 1)]

    def run():
        r = PagedRunner(model)
        r.step([(sid, ids[:6], 0, k) for sid, ids, k in seqs])  # prefills: six tokens each
        items = [(sid, ids[6:7], 6, k) for sid, ids, k in seqs[1:]]  # decode rows
        items.insert(1, (seqs[0][0], seqs[0][1][6:], 6, seqs[0][2]))  # a chunk over 6 cached tokens
        items.append((50, rand_ids(cfg, 10, seed=50), 0, n))  # a fresh prompt at every chain
        return r.step(items, all_logits=True)

    calls = []
    step_pairs = attention._step_pairs
    monkeypatch.setattr(attention, "_step_pairs", lambda *a: calls.append(1) or step_pairs(*a))
    pairs = run()
    assert len(calls) == 2  # both steps took the pairs
    monkeypatch.setattr(attention, "PAIRS_MAX_WORK", 0)
    groups = run()
    assert len(calls) == 2
    for a, b in zip(pairs, groups):
        torch.testing.assert_close(a, b, **TOL)
